"""Photograph a finished job in the Prefect UI (the README's screenshot), in headless Chromium.

    python docs/ui_screenshot.py [-o docs/prefect-ui-finished-job.png] [--chromium PATH]

Starts `emo serve` on a free port with a throwaway EMO_HOME, renders the demo job against it
(`emo demo`: the shipped demo model, about two minutes on two cores), finds the job's
render-track flow run through Prefect's API and saves a screenshot of its Artifacts tab.
Needs Chromium (Debian: `apt-get install chromium`); nothing else beyond the project.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
EMO = Path(sys.executable).with_name("emo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, seconds: float, what: str) -> None:  # noqa: ANN001 (a predicate)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"timed out waiting for {what}")


def latest_render_run(api: str) -> str:
    """Id of the newest render-track flow run."""
    body = {"flows": {"name": {"any_": ["render-track"]}}, "sort": "START_TIME_DESC", "limit": 1}
    runs = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()
    if not runs:
        raise SystemExit("no render-track run found on the server")
    return runs[0]["id"]


class DevTools:
    """A minimal Chrome DevTools Protocol client: send a command, wait for its answer."""

    def __init__(self, socket_url: str) -> None:
        from websockets.sync.client import connect

        self.socket = connect(socket_url, max_size=None)
        self.counter = 0

    def __call__(self, method: str, **params: object) -> dict:
        self.counter += 1
        self.socket.send(json.dumps({"id": self.counter, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.counter:
                if "error" in message:
                    raise SystemExit(f"Chromium: {method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> object:
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get(
            "value"
        )

    def until(self, expression: str, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what} in the page")
            time.sleep(0.5)


CLICK_ARTIFACTS_TAB = """(() => {
  const tab = [...document.querySelectorAll('button, a, [role="tab"], li')]
    .find(e => e.textContent.trim() === 'Artifacts');
  if (tab) { tab.click(); return true; }
  return false;
})()"""


def screenshot(chromium: str, url: str, output: Path, wait_for: str) -> None:
    """Open ``url`` in headless Chromium, open its Artifacts tab, wait until ``wait_for``
    appears in the page, save a PNG of the window."""
    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",  # root in a container has no user namespaces for the sandbox
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1440,1000",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            debugger = f"http://127.0.0.1:{port}/json"
            wait_until(lambda: httpx.get(f"{debugger}/version").status_code == 200, 60, "Chromium")
            pages = [t for t in httpx.get(f"{debugger}/list").json() if t["type"] == "page"]
            page = DevTools(pages[0]["webSocketDebuggerUrl"])
            page("Page.enable")
            page("Page.navigate", url=url)
            page.until(CLICK_ARTIFACTS_TAB, 60, "the Artifacts tab")
            page.until(f"document.body.innerText.includes({json.dumps(wait_for)})", 60, wait_for)
            time.sleep(2)  # let the progress bar and tables finish drawing
            shot = page("Page.captureScreenshot", format="png")["data"]
            output.write_bytes(base64.b64decode(shot))
        finally:
            browser.terminate()
            browser.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-o", "--output", type=Path, default=ROOT / "docs/prefect-ui-finished-job.png"
    )
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--weights", help="EMO_WEIGHTS for the job (default: the demo model)")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server below
    home = Path(tempfile.mkdtemp(prefix="emo-screenshot-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EMO_"))}
    env["EMO_HOME"] = str(home)
    if args.weights:
        env["EMO_WEIGHTS"] = str(Path(args.weights).resolve())
    log = (home / "serve.log").open("w")
    server = subprocess.Popen(
        [str(EMO), "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 180, "the server"
        )
        print(f"Prefect UI on http://127.0.0.1:{port}; rendering the demo job ...")
        subprocess.run(
            [str(EMO), "demo", "-o", str(home / "demo.mp4")],
            env={**env, "PREFECT_API_URL": api},
            check=True,
            cwd=ROOT,
        )
        run = latest_render_run(api)
        url = f"http://127.0.0.1:{port}/runs/flow-run/{run}"
        args.output.parent.mkdir(parents=True, exist_ok=True)
        screenshot(args.chromium, url, args.output, wait_for="-qc")
        print(f"saved {args.output} ({url})")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
