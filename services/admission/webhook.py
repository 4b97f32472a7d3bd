"""Admission webhooks over HTTPS: ``/validate`` and ``/mutate`` (AdmissionReview v1).

``/validate`` parses the object with ``shared.api.parse_object`` (the same models the CRDs are
generated from) and denies it with the field-path messages; for a Run it also denies an owner the
namespace is not authorised for (``shared.control.tenancy``; a namespace it cannot read authorises
nobody) and a pod template the pod policy refuses (``shared.control.pod_policy``: the message
names each field path and the template size limit). ``/mutate`` adds the defaults the
API promises as a JSONPatch: ``spec.locality.allowCrossGroupSpread: true`` and
``spec.malleable.desiredTotalGPUs = maxTotalGPUs``.

TLS: ``--tls-cert``/``--tls-key`` when given, else a self-signed certificate generated at start
for ``--tls-hosts``; its PEM is the ``caBundle`` to register. Registering the webhook with the API
server is a deployment concern (the Helm chart).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import logging
import shutil
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.admission.config import AdmissionConfig
from shared.api import API_VERSION, ApiValidationError, Run, parse_object
from shared.control.pod_policy import PodPolicyConfig, check_template
from shared.control.tenancy import DEFAULT_OWNER_GLOBS, check_owner

log = logging.getLogger(__name__)

Annotations = Callable[[str], Awaitable[Mapping[str, str] | None]]
"""Looks up a namespace's annotations (None when the namespace is unknown)."""
REVIEW_VERSION = "admission.k8s.io/v1"


# -- pure review logic ----------------------------------------------------------------------------


def review_response(
    uid: str,
    *,
    allowed: bool,
    message: str = "",
    code: int = 403,
    patch: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """An AdmissionReview v1 response document."""
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        response["status"] = {
            "code": code,
            "message": message,
            "reason": "Invalid" if code == 422 else "Forbidden",
        }
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(list(patch)).encode()).decode()
    return {"apiVersion": REVIEW_VERSION, "kind": "AdmissionReview", "response": response}


def _ours(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("apiVersion") == API_VERSION


def validate_object(
    obj: Mapping[str, Any],
    namespace: str | None,
    annotations: Mapping[str, str] | None,
    default_globs: Sequence[str] = DEFAULT_OWNER_GLOBS,
    policy: PodPolicyConfig | None = None,
) -> tuple[bool, str, int]:
    """(allowed, message, HTTP code) for one Jobtree object (``policy`` None: the default)."""
    try:
        parsed = parse_object(obj)
    except ApiValidationError as exc:
        kind = obj.get("kind") or "object"
        name = (obj.get("metadata") or {}).get("name") or ""
        return False, f"{kind} {name} is invalid: " + "; ".join(exc.issues), 422
    if isinstance(parsed, Run) and namespace:
        denied = check_owner(parsed.spec.owner, namespace, annotations, default_globs)
        if denied is not None:
            return False, denied.message, 403
    if isinstance(parsed, Run):
        template = (obj.get("spec") or {}).get("template")
        refused = check_template(template, policy or PodPolicyConfig())
        if refused is not None:
            return False, refused.message, 403
    return True, "", 200


def mutation_patch(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """JSONPatch adding a Run's documented defaults (nothing for other kinds)."""
    if not _ours(obj) or obj.get("kind") != "Run":
        return []
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return []
    ops: list[dict[str, Any]] = []
    locality = spec.get("locality")
    if locality is None:
        ops.append(
            {"op": "add", "path": "/spec/locality", "value": {"allowCrossGroupSpread": True}}
        )
    elif isinstance(locality, Mapping) and "allowCrossGroupSpread" not in locality:
        ops.append({"op": "add", "path": "/spec/locality/allowCrossGroupSpread", "value": True})
    mall = spec.get("malleable")
    if isinstance(mall, Mapping) and "desiredTotalGPUs" not in mall and "maxTotalGPUs" in mall:
        ops.append(
            {"op": "add", "path": "/spec/malleable/desiredTotalGPUs", "value": mall["maxTotalGPUs"]}
        )
    return ops


# -- certificates ---------------------------------------------------------------------------------


def self_signed(hosts: Sequence[str], *, days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a self-signed serving certificate for ``hosts``.

    The certificate is its own CA (``caBundle`` is the certificate itself).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobtree-admission")])
    sans: list[x509.GeneralName] = []
    for host in hosts or ("localhost",):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# -- the server -----------------------------------------------------------------------------------


class WebhookServer:
    """HTTPS server for /validate, /mutate and /healthz."""

    def __init__(
        self,
        annotations: Annotations,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        tls_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        default_globs: Sequence[str] = DEFAULT_OWNER_GLOBS,
        policy: PodPolicyConfig | None = None,
    ) -> None:
        if (cert_pem is None) != (key_pem is None):
            raise ValueError("give both a TLS certificate and key, or neither")
        if cert_pem is None or key_pem is None:
            cert_pem, key_pem = self_signed(tls_hosts)
        self.cert_pem = cert_pem
        self._key_pem = key_pem
        self._annotations = annotations
        self._host = host
        self._port = port
        self._default_globs = tuple(default_globs)
        self._policy = policy or PodPolicyConfig()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._dir: Path | None = None

    @classmethod
    def from_config(cls, cfg: AdmissionConfig, annotations: Annotations) -> WebhookServer:
        cert = Path(cfg.tls_cert).read_bytes() if cfg.tls_cert else None
        key = Path(cfg.tls_key).read_bytes() if cfg.tls_key else None
        return cls(
            annotations,
            host=cfg.webhook_host,
            port=cfg.webhook_port or 0,
            cert_pem=cert,
            key_pem=key,
            tls_hosts=cfg.tls_hosts,
            default_globs=cfg.default_owner_globs,
            policy=cfg.pod_policy,
        )

    @property
    def ca_bundle(self) -> str:
        """base64 of the serving certificate: the ``caBundle`` of a webhook registration."""
        return base64.b64encode(self.cert_pem).decode()

    @property
    def port(self) -> int:
        if self._site is None or self._site._server is None:
            return self._port
        sockets = getattr(self._site._server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else self._port

    def _ssl(self) -> ssl.SSLContext:
        self._dir = Path(tempfile.mkdtemp(prefix="jobtree-webhook-"))
        cert, key = self._dir / "tls.crt", self._dir / "tls.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self._key_pem)
        key.chmod(0o600)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        return context

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/validate", self._validate)
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl())
        await self._site.start()
        log.info("webhook serving", extra={"host": self._host, "port": self.port})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    @staticmethod
    async def _review(request: web.Request) -> Mapping[str, Any]:
        try:
            doc = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"not JSON: {exc}") from exc
        review = doc.get("request") if isinstance(doc, Mapping) else None
        if not isinstance(review, Mapping) or not isinstance(review.get("uid"), str):
            raise web.HTTPBadRequest(text="not an AdmissionReview request")
        return review

    async def _validate(self, request: web.Request) -> web.Response:
        review = await self._review(request)
        uid = str(review["uid"])
        obj = review.get("object")
        if review.get("subResource") or not _ours(obj) or review.get("operation") == "DELETE":
            return web.json_response(review_response(uid, allowed=True))
        assert isinstance(obj, Mapping)
        namespace = review.get("namespace") or (obj.get("metadata") or {}).get("namespace")
        annotations = None
        if obj.get("kind") == "Run" and namespace:
            try:
                annotations = await self._annotations(str(namespace))
            except Exception:  # unreadable: None, which authorises nobody
                log.warning(
                    "namespace lookup failed", extra={"namespace": namespace}, exc_info=True
                )
        allowed, message, code = validate_object(
            obj,
            str(namespace) if namespace else None,
            annotations,
            self._default_globs,
            self._policy,
        )
        if not allowed:
            log.info("webhook denied", extra={"uid": uid, "reason": message})
        return web.json_response(review_response(uid, allowed=allowed, message=message, code=code))

    async def _mutate(self, request: web.Request) -> web.Response:
        review = await self._review(request)
        uid = str(review["uid"])
        obj = review.get("object")
        if review.get("subResource") or not isinstance(obj, Mapping):
            return web.json_response(review_response(uid, allowed=True))
        return web.json_response(review_response(uid, allowed=True, patch=mutation_patch(obj)))
