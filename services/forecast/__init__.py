"""The forecast service: Reservations with computed ETAs, risk marks and timely activation."""
