"""A bound on every HTTP request body (JSON calls, data: URLs, uploads), answered with 413 and one line."""
from __future__ import annotations

import json


class BodyLimit:
    """ASGI middleware: refuse a request whose body is larger than `max_bytes` before the app parses it.

    Gradio limits file uploads (`max_file_size`) but not the JSON body of an API call, which can carry a
    `data:` image or a huge stack; this covers both, whether the client sends Content-Length or not.
    """

    def __init__(self, app, max_bytes: int, flag: str = "--max-upload"):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.flag = flag

    def _message(self, size: str) -> bytes:
        return json.dumps({"error": f"request body is {size}; this server accepts at most {self.max_bytes} bytes "
                                    f"({self.flag}); send a smaller file or request"}).encode()

    async def _refuse(self, send, size: str) -> None:
        body = self._message(size)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                n = -1
            if n > self.max_bytes:
                return await self._refuse(send, f"{n} bytes")
        seen = 0
        started = False
        over = False

        async def limited_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                if over:
                    return
                started = True
            elif over and not started:
                return
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if over and not started:
            await self._refuse(send, f"over {self.max_bytes} bytes")


def body_limit_for(max_upload_bytes: int) -> int:
    """An upload of `max_upload_bytes` fits (multipart framing, or base64 in a data: URL at 4/3 the size)."""
    return max_upload_bytes * 4 // 3 + (1 << 20)
