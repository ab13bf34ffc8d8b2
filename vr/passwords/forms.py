"""The bodies of ``save_password`` POSTs: urlencoded or multipart forms. Pure."""

from __future__ import annotations

import email.parser
import email.policy
import urllib.parse

from vr.errors import VRError, shorten

MAX_FIELDS = 16


class FormError(VRError):
    """A save request's body is not a form we accept."""


def parse_form(content_type: str, body: bytes) -> dict[str, str]:
    """Fields of an urlencoded or multipart/form-data body; duplicates are refused."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        pairs = _urlencoded(body)
    elif kind == "multipart/form-data":
        pairs = _multipart(content_type, body)
    else:
        raise FormError(
            f"Content-Type={shorten(content_type)}: expected "
            "application/x-www-form-urlencoded or multipart/form-data"
        )
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise FormError(f"field {shorten(name)} given twice: expected each field once")
        fields[name] = value
    return fields


def _urlencoded(body: bytes) -> list[tuple[str, str]]:
    try:
        text = body.decode("ascii")
        return urllib.parse.parse_qsl(
            text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS
        )
    except UnicodeDecodeError:
        raise FormError("urlencoded body: expected ASCII with UTF-8 %-escapes") from None
    except ValueError:
        raise FormError(f"urlencoded body: expected at most {MAX_FIELDS} fields") from None


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    if "\r" in content_type or "\n" in content_type:
        raise FormError("Content-Type: expected a single header line")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart() or msg.get_boundary() is None:
        raise FormError("multipart body: expected a boundary and form-data parts")
    pairs = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or part.get_content_disposition() != "form-data":
            raise FormError("multipart part: expected Content-Disposition: form-data; name=...")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise FormError(f"multipart field {shorten(name)}: expected a plain value")
        try:
            pairs.append((name, payload.decode("utf-8")))
        except UnicodeDecodeError:
            raise FormError(f"multipart field {shorten(name)}: expected UTF-8") from None
        if len(pairs) > MAX_FIELDS:
            raise FormError(f"multipart body: expected at most {MAX_FIELDS} fields")
    return pairs
