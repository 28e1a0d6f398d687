"""TLS and SASL for every Kafka client fleetscope makes (the agent's producer, the
ingester's consumer and dead-letter producer), and errors an operator can act on.

aiokafka takes an ``ssl.SSLContext`` and SASL keyword arguments; `client_options` builds
them from the settings each time a client is created, so a rotated password file or
certificate is picked up at the next reconnect. When a client cannot start, aiokafka says
only "Unable to bootstrap"; `explain` connects once more to each broker and names the
cause: an untrusted certificate, a refused login, a listener that speaks another protocol.
The password never appears in a log line or an error message.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka import errors as kafka_errors
from aiokafka.conn import create_conn
from aiokafka.protocol.metadata import MetadataRequest

from fleetscope.config import ConfigError, Kafka
from fleetscope.credentials import scrub
from fleetscope.retry import first_line

__all__ = ["KafkaAuth", "client_options", "describe", "explain", "ssl_context"]

EXPLAIN_TIMEOUT = 10.0  # seconds for the diagnostic connection to one broker


def ssl_context(s: Kafka) -> ssl.SSLContext:
    """The TLS context of the settings: CA file (else the system's), client certificate,
    hostname check. Raises ConfigError naming the key whose file is unusable."""
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(s.kafka_ssl_cafile) if s.kafka_ssl_cafile else None
        )
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"kafka_ssl_cafile: cannot use {s.kafka_ssl_cafile} as CA certificates ({_reason(e)}); give a PEM file"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = s.kafka_ssl_check_hostname
    if s.kafka_ssl_certfile is not None:
        keyfile = str(s.kafka_ssl_keyfile) if s.kafka_ssl_keyfile else None
        try:
            ctx.load_cert_chain(str(s.kafka_ssl_certfile), keyfile)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"kafka_ssl_certfile: cannot use {s.kafka_ssl_certfile} with key {keyfile or '(in the same file)'} "
                f"({_reason(e)}); give a PEM certificate and its unencrypted PEM key (kafka_ssl_keyfile)"
            ) from None
    return ctx


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).lower().replace("_", " ")
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return first_line(e)


class KafkaAuth:
    """The security of one service's Kafka clients, handed to whatever creates them."""

    def __init__(self, settings: Kafka) -> None:
        self.settings = settings

    def options(self) -> dict[str, Any]:
        """aiokafka keyword arguments (see client_options), fresh for each new client."""
        return client_options(self.settings)

    def describe(self) -> str:
        return describe(self.settings)

    async def explain(self, error: BaseException) -> str:
        return await explain(self.settings, error)


def client_options(s: Kafka) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer/AIOKafkaConsumer: security protocol, TLS
    context, SASL mechanism and credentials (the password file read now)."""
    proto = s.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": proto}
    if proto in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl_context(s)
    if proto.startswith("SASL_"):
        options["sasl_mechanism"] = s.kafka_sasl_mechanism
        options["sasl_plain_username"] = s.kafka_sasl_username
        options["sasl_plain_password"] = str(s.kafka_password())
    return options


def describe(s: Kafka) -> str:
    """How the clients connect, for log lines: 'SASL_SSL as agent (SCRAM-SHA-512)'."""
    proto = s.kafka_security_protocol
    if proto.startswith("SASL_"):
        return f"{proto} as {s.kafka_sasl_username} ({s.kafka_sasl_mechanism})"
    if proto == "SSL" and s.kafka_ssl_certfile is not None:
        return "SSL with a client certificate"
    return proto


async def explain(s: Kafka, error: BaseException) -> str:
    """Why a Kafka client could not start, in one line with the fix when it is a
    configuration matter; the error's own text when every broker accepts a connection."""
    secrets = [str(s.kafka_sasl_password)]
    try:
        options = client_options(s)
    except ConfigError as e:  # e.g. the password file disappeared since start-up
        return str(e)
    secrets.append(options.get("sasl_plain_password", ""))
    found = await asyncio.gather(
        *(_try_broker(s, b.rpartition(":")[0], int(b.rpartition(":")[2]), options) for b in s.brokers)
    )
    reasons = [f"{broker}: {reason}" for broker, reason in zip(s.brokers, found, strict=True) if reason]
    text = "; ".join(reasons) if reasons else first_line(error)
    return scrub(text, secrets)


async def _try_broker(s: Kafka, host: str, port: int, options: dict[str, Any]) -> str:
    """Connect, log in (SASL) and ask one broker for metadata; "" if that works, else the cause."""
    proto = s.kafka_security_protocol
    tls = proto in ("SSL", "SASL_SSL")
    conn = None
    step = "connect"
    try:
        async with asyncio.timeout(EXPLAIN_TIMEOUT):
            conn = await create_conn(host, port, request_timeout_ms=int(EXPLAIN_TIMEOUT * 1000), **options)
            step = "metadata"
            await conn.send(MetadataRequest([]))
        return ""
    except ssl.SSLCertVerificationError as e:
        return (
            f"the broker's TLS certificate is not trusted ({e.verify_message}); set kafka_ssl_cafile to the CA "
            "that signed it (and check that the certificate names this host)"
        )
    except ssl.SSLError as e:
        reason = _reason(e)
        if "wrong version number" in reason or "record layer failure" in reason or "packet length" in reason:
            return f"TLS handshake failed ({reason}): this port does not speak TLS (a PLAINTEXT listener?)"
        if "certificate" in reason or "handshake failure" in reason:
            return (
                f"TLS handshake failed ({reason}): the broker wants a client certificate it trusts; "
                "set kafka_ssl_certfile and kafka_ssl_keyfile"
            )
        return f"TLS handshake failed ({reason})"
    except (kafka_errors.SaslAuthenticationFailed, kafka_errors.AuthenticationFailedError) as e:
        return (
            f"authentication as {s.kafka_sasl_username!r} ({s.kafka_sasl_mechanism}) failed ({first_line(e)}); "
            "check kafka_sasl_username and the password (FLEETSCOPE_KAFKA_SASL_PASSWORD or kafka_sasl_password_file)"
        )
    except kafka_errors.UnsupportedSaslMechanismError as e:
        return f"{first_line(e)}; set kafka_sasl_mechanism to one the broker enables"
    except kafka_errors.IllegalSaslStateError as e:
        return f"the broker refused SASL ({first_line(e)}): is this a SASL listener? (kafka_security_protocol {proto})"
    except TimeoutError:
        hint = "" if tls else " (a TLS listener waits for a handshake that a PLAINTEXT client never starts)"
        return f"no answer within {EXPLAIN_TIMEOUT:.0f}s{hint}"
    except ConnectionRefusedError as e:
        return e.strerror or "connection refused"
    except (kafka_errors.KafkaConnectionError, ConnectionError, asyncio.IncompleteReadError) as e:
        if tls and conn is None and not isinstance(e, kafka_errors.KafkaConnectionError):
            return f"the broker closed the connection during the TLS handshake: this port may not speak TLS ({proto})"
        if not tls:
            return (
                "the broker closed the connection; if this is a TLS listener, set kafka_security_protocol "
                "SSL or SASL_SSL"
            )
        wants = [] if s.kafka_ssl_certfile else ["a client certificate it trusts (kafka_ssl_certfile)"]
        wants += ["a SASL login (kafka_security_protocol SASL_SSL)"] if proto == "SSL" else []
        return f"the broker closed the connection after the TLS handshake ({step})" + (
            f": it may want {' or '.join(wants)}" if wants else ""
        )
    except OSError as e:
        return e.strerror or first_line(e)
    except kafka_errors.KafkaError as e:
        return first_line(e)
    finally:
        if conn is not None:
            conn.close()
        # a failed TLS connection closes its socket from callbacks the loop runs next: let
        # them run before the caller (or a test) may close the loop
        for _ in range(3):
            await asyncio.sleep(0)
