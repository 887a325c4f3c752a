"""A minimal application backend for benchmarks/backend_bench.py: every hook call accepted.

    python -m benchmarks.hook_backend PORT

One Tornado process answering `{"result": {}}` to every `POST /herald/<hook>`,
so what the benchmark measures is Herald's side of a hook call (the HTTP
round trip included), not an application's work.
"""

from __future__ import annotations

import asyncio
import sys

from tornado.web import Application, RequestHandler


class Hook(RequestHandler):
    def post(self, hook: str) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(b'{"result": {}}')


class Ready(RequestHandler):
    def get(self) -> None:
        self.finish(b'{"ready": true}')


async def main(port: int) -> None:
    Application([(r"/herald/(\w+)", Hook), (r"/readyz", Ready)]).listen(port, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
