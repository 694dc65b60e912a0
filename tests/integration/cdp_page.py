"""Open a page in real headless Chromium (Chrome DevTools Protocol over --remote-debugging-pipe).

    python cdp_page.py CHROMIUM URL TIMEOUT_S TEXT...

Waits (bounded by TIMEOUT_S) until the page's text holds every TEXT and its
``body.dataset.refreshes`` counter reached 3 (the page refreshed by itself),
then prints one JSON line: ``{"found", "refreshes", "text", "errors"}``;
``errors`` are console errors, uncaught exceptions and failed loads. Chromium
runs with a fresh profile and no network services, and is always killed.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-pipe",
]


class Pipe:
    def __init__(self, write_fd: int, read_fd: int, deadline: float) -> None:
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, deadline
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def receive(self) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed the pipe")
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)


def errors_in(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + json.dumps(p.get("args", []))[:500])
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append("log: " + p["entry"].get("text", "")[:500])
    return out


def main(binary: str, url: str, timeout: str, *expect: str) -> None:
    deadline = time.monotonic() + float(timeout)
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def fds() -> None:  # Chromium reads commands on fd 3 and writes on fd 4
        # Through spare numbers first: the pipes may themselves be 3 or 4.
        os.dup2(to_chrome_r, 100)
        os.dup2(from_chrome_w, 101)
        os.dup2(100, 3)  # os.dup2 makes the new descriptor inheritable
        os.dup2(101, 4)

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds,
            # Not close_fds: it would close 3 and 4 after preexec_fn; Python's own
            # descriptors are close-on-exec anyway, and dup2 clears that flag on 3 and 4.
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        try:
            cdp = Pipe(to_chrome_w, from_chrome_r, deadline)
            target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Runtime", "Log", "Page"):
                cdp.send(f"{domain}.enable", session=session)
            cdp.send("Page.navigate", {"url": url}, session=session)
            text, refreshes, found = "", 0, False
            while time.monotonic() < deadline:  # bounded polling of a subprocess's page
                value = cdp.send(
                    "Runtime.evaluate",
                    {
                        "expression": "JSON.stringify([document.body ? document.body.innerText"
                        " : '', Number((document.body || {dataset: {}}).dataset.refreshes || 0)])",
                        "returnByValue": True,
                    },
                    session=session,
                )["result"].get("value", '["", 0]')
                text, refreshes = json.loads(value)
                found = all(t in text for t in expect)
                if found and refreshes >= 3:
                    break
                time.sleep(0.2)
            print(
                json.dumps(
                    {
                        "found": found,
                        "refreshes": refreshes,
                        "text": text,
                        "errors": errors_in(cdp.events),
                    }
                )
            )
        finally:
            proc.kill()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:])
