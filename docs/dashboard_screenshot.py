"""Screenshot of the Ray dashboard's Actors view while the bundled demo trains (docs/dashboard_actors.png).

Not part of the package or the tests. Needs Playwright (``pip install playwright`` in any
Python) and a Chromium (Debian's ``chromium`` package at /usr/bin/chromium):

    python docs/dashboard_screenshot.py --python .venv/bin/python

It starts ``python -m ensemble.driver`` (the demo, its own local cluster, dashboard on
127.0.0.1:8265), waits until member actors are alive, opens the dashboard with the cluster's
token (~/.ray/auth_token, sent as the dashboard's login cookie), takes the picture and stops the
driver with Ctrl-C (SIGINT), which stops its members and its cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

DASHBOARD = "http://127.0.0.1:8265"


def alive_members(token: str) -> list[str]:
    request = urllib.request.Request(f"{DASHBOARD}/api/v0/actors?detail=false&limit=100",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            rows = json.load(response)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):
        return []
    return [r.get("name", "") for r in rows
            if r.get("state") == "ALIVE" and r.get("name", "").startswith("ensemble-member")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the Python that has this project installed")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out",
                        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_actors.png"))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    output = tempfile.mkdtemp(prefix="ensemble-screenshot-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([args.python, "-m", "ensemble.driver", "--output", output], env=env,
                              start_new_session=True)
    try:
        token_path = os.path.expanduser("~/.ray/auth_token")
        deadline = time.time() + 300
        while not (os.path.exists(token_path) and alive_members(open(token_path).read().strip())):
            if driver.poll() is not None or time.time() > deadline:
                print("the driver ended or no member actor came up", file=sys.stderr)
                return 1
            time.sleep(1)
        time.sleep(15)  # a few epochs in, so the view shows the members at work
        token = open(token_path).read().strip()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.context.add_cookies([{"name": "ray-authentication-token", "value": token, "url": DASHBOARD}])
            page.goto(f"{DASHBOARD}/#/actors")
            page.get_by_text("ensemble-member", exact=False).first.wait_for(timeout=60_000)
            page.wait_for_timeout(3000)  # let the table and its charts settle
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out}")
        return 0
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGINT)
            try:
                driver.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(driver.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
