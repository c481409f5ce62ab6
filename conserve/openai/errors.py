"""OpenAI error objects: the exception the layer raises, and validation failures as one."""

from __future__ import annotations

from typing import Any


class OpenAIError(Exception):
    """An error answered as OpenAI does: an HTTP status and an `{"error": {...}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """A pydantic validation failure as the 400 error the endpoints answer (the first problem,
    located by its field path without the leading "body")."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = first.get("msg", "invalid request")
    return OpenAIError(400, f"{'.'.join(loc) or 'body'}: {msg}", param=".".join(loc) or None)
