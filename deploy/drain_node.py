#!/usr/bin/env python3
"""Drain the pdserve engine instances of one Ray node before it goes away.

    python deploy/drain_node.py --gateway http://llm-pdserve-gateway:80 --node-ip 10.1.2.3 --deadline 100

The Helm chart runs this as the `preStop` hook of its worker pods (the image
has it at /opt/pdserve/bin/drain_node.py); on a plain Ray cluster run it on a
machine before `ray stop` there. Standard library only, so that it runs in
any image and needs nothing from pdserve's own environment.

Lifecycle (every step bounded by --deadline):
  1. `GET /admin/instances`; this node's instances are those whose `node_ip`
     is --node-ip (on KubeRay: the pod's IP). None: done at once.
  2. Ask the gateway to drain exactly those: `POST /admin/drain`
     `{"instances": [...]}` (the router places nothing new on them, running
     requests finish, then they are stopped). A gateway that answers 404/405
     (an older pdserve) has no targeted drain; then the script can only wait for the node's instances to be idle (no running, waiting or
     in-flight request on two polls in a row), while the router may still
     place new requests on them.
  3. Poll until the node's instances have left the registry (targeted) or are
     idle (fallback). Exit 0 then; exit 1 at the deadline, or once the gateway
     has not answered for --unreachable seconds in a row (Kubernetes records a
     FailedPreStopHook event; the pod is stopped anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from enum import Enum

DRAIN_ROUTE = "/admin/drain"


class Mode(Enum):
    TARGETED = "targeted"  # the gateway drains and removes the chosen instances
    WAIT_IDLE = "wait-idle"  # no targeted drain: wait until the node's instances hold no request


class GatewayError(Exception):
    """The gateway could not be reached or refused the call (other than 'no such route')."""


def node_instances(view: dict, node_ip: str) -> list[str]:
    """Ids of the registered instances on `node_ip` (starting ones are not listed by the gateway)."""
    return sorted(item["instance_id"] for item in view.get("instances", []) if item.get("node_ip") == node_ip)


def busy(item: dict) -> bool:
    return bool(item.get("num_running") or item.get("num_waiting") or item.get("in_flight"))


def remaining(view: dict, ids: list[str], mode: Mode) -> list[str]:
    """Which of `ids` still keep the node from going: listed at all (targeted), or busy (fallback)."""
    listed = {item["instance_id"]: item for item in view.get("instances", [])}
    if mode is Mode.TARGETED:
        return [iid for iid in ids if iid in listed]
    return [iid for iid in ids if iid in listed and busy(listed[iid])]


class Gateway:
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float) -> None:
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return reply.status, json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, {"error": exc.read().decode(errors="replace")[:500]}
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise GatewayError(f"{method} {path}: {exc}") from exc

    def instances(self) -> dict:
        status, view = self._call("GET", "/admin/instances")
        if status != 200:
            raise GatewayError(f"GET /admin/instances answered {status}: {view.get('error')}")
        return view

    def drain(self, ids: list[str]) -> Mode:
        status, reply = self._call("POST", DRAIN_ROUTE, {"instances": ids})
        if status in (404, 405):
            return Mode.WAIT_IDLE
        if status >= 400:
            raise GatewayError(f"POST {DRAIN_ROUTE} answered {status}: {reply.get('error')}")
        return Mode.TARGETED


def drain_node(gateway: Gateway, node_ip: str, deadline_s: float, poll_s: float = 1.0,
               settle_polls: int = 2, unreachable_s: float = 15.0, log=print) -> bool:
    """Drain `node_ip`'s instances; True once none keeps the node, False at the deadline.

    A gateway unreachable for `unreachable_s` in a row ends it early: the gateway owns
    the instances, so with it gone (e.g. `helm uninstall` stops every pod at once)
    there is nothing left to drain through, and waiting would only hold the pod.
    """
    deadline = time.monotonic() + deadline_s
    ids: list[str] | None = None
    mode: Mode | None = None
    idle_polls = 0
    reached = time.monotonic()  # the last time the gateway answered (or the start)
    while True:
        try:
            view = gateway.instances()
            reached = time.monotonic()
            if ids is None:
                ids = node_instances(view, node_ip)
                if not ids:
                    log(f"drain: no pdserve instance on {node_ip}")
                    return True
            if mode is None:
                mode = gateway.drain(ids)
                log(f"drain: {', '.join(ids)} on {node_ip} ({mode.value})")
                view = gateway.instances()
            left = remaining(view, ids, mode)
            idle_polls = idle_polls + 1 if not left else 0
            if not left and (mode is Mode.TARGETED or idle_polls >= settle_polls):
                log(f"drain: {node_ip} is free ({mode.value})")
                return True
        except GatewayError as exc:
            left = ids or []
            log(f"drain: {exc}")
            if time.monotonic() - reached >= unreachable_s:
                log(f"drain: the gateway has not answered for {unreachable_s:.0f} s; giving up")
                return False
        if time.monotonic() + poll_s > deadline:
            log(f"drain: deadline of {deadline_s:.0f} s passed; still there: {', '.join(left) or 'unknown'}")
            return False
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", default=os.environ.get("PDSERVE_GATEWAY_URL", "http://127.0.0.1:8000"),
                        help="pdserve's gateway (default: $PDSERVE_GATEWAY_URL).")
    parser.add_argument("--node-ip", default=os.environ.get("PDSERVE_NODE_IP") or os.environ.get("POD_IP"),
                        help="This node's Ray address (default: $PDSERVE_NODE_IP, else $POD_IP).")
    parser.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="The gateway's API key (default: $PDSERVE_API_KEY).")
    parser.add_argument("--deadline", type=float, default=float(os.environ.get("PDSERVE_DRAIN_DEADLINE_S", 100)),
                        help="Give up after this many seconds (keep it under the pod's grace period).")
    parser.add_argument("--poll", type=float, default=1.0, help="Seconds between polls.")
    parser.add_argument("--unreachable", type=float, default=15.0,
                        help="Give up once the gateway has not answered for this many seconds in a row.")
    parser.add_argument("--timeout", type=float, default=5.0, help="HTTP timeout per call, in seconds.")
    args = parser.parse_args(argv)
    if not args.node_ip:
        parser.error("--node-ip (or $PDSERVE_NODE_IP) is required")
    gateway = Gateway(args.gateway, args.api_key, args.timeout)
    ok = drain_node(gateway, args.node_ip, args.deadline, args.poll, unreachable_s=args.unreachable,
                    log=lambda m: print(m, flush=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
