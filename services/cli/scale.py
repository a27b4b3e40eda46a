"""`pdserve scale`: add or remove engine instances of a running pdserve server.

    pdserve scale --prefill 2 --decode 3                 # against http://127.0.0.1:8000
    pdserve scale --decode 1 --base-url http://gw:8000 --api-key $KEY
    pdserve scale --list                                  # the instances and their states

New instances join once their engines are up (tens of seconds); removed ones
stop taking requests at once and leave after their requests end. With
--wait the command returns only when the cluster has the asked shape.
"""

from __future__ import annotations

import argparse
import os
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="The pdserve gateway.")
    parser.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="The gateway's API key (default: $PDSERVE_API_KEY).")
    for role in ("prefill", "decode", "mixed"):
        parser.add_argument(f"--{role}", type=int, help=f"{role.capitalize()} instances wanted.")
    parser.add_argument("--list", action="store_true", help="Only list the instances.")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="Wait up to this long for the new shape (0: return at once).")
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout per call, in seconds.")


def _show(view: dict) -> None:
    for item in view["instances"]:
        print(f"{item['instance_id']:<12} {item['role']:<8} {item['state']:<10} "
              f"running={item['num_running']} waiting={item['num_waiting']}")
    if view.get("starting"):
        print("starting: " + ", ".join(f"{n} {role}" for role, n in view["starting"].items()))


def _settled(view: dict, want: dict[str, int]) -> bool:
    if view.get("starting"):
        return False
    counts: dict[str, int] = {}
    for item in view["instances"]:
        if item["state"] != "draining":
            counts[item["role"]] = counts.get(item["role"], 0) + 1
    leaving = any(item["state"] == "draining" for item in view["instances"])
    return not leaving and all(counts.get(role, 0) == n for role, n in want.items())


def run(args: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    want = {role: getattr(args, role) for role in ("prefill", "decode", "mixed") if getattr(args, role) is not None}
    with httpx.Client(base_url=args.base_url, headers=headers, timeout=args.timeout) as client:
        try:
            if args.list or not want:
                response = client.get("/admin/instances")
            else:
                response = client.post("/admin/scale", json=want)
        except httpx.HTTPError as exc:
            print(f"pdserve scale: cannot reach {args.base_url}: {exc}")
            return 1
        if response.status_code >= 400:
            print(f"pdserve scale: {response.json().get('error', {}).get('message', response.text)}")
            return 2
        view = response.json()
        if "plan" in view:
            print(f"plan: add {view['plan']['add'] or 'nothing'}, remove {view['plan']['remove'] or 'nothing'}")
        deadline = time.monotonic() + args.wait
        while want and args.wait and not _settled(view, want):
            if time.monotonic() > deadline:
                print("pdserve scale: the new shape is not reached yet")
                _show(view)
                return 1
            time.sleep(1.0)
            view = client.get("/admin/instances").json()
    _show(view)
    return 0
