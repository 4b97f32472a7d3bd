"""The admission service: authorises, covers and drives each Run through PLAN, COMMIT or RESERVE,
and keeps Run and Budget status true to the Lease ledger (see ``docs/services-admission.md``)."""
