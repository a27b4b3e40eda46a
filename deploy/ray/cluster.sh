#!/usr/bin/env bash
# pdserve on a plain Ray cluster (no Kubernetes). Run each step on its machine:
#
#   deploy/ray/cluster.sh head                      head machine: Ray head, no engine on it
#   deploy/ray/cluster.sh worker prefill HEAD:6379  each prefill machine
#   deploy/ray/cluster.sh worker decode HEAD:6379   each decode machine
#   deploy/ray/cluster.sh serve [pdserve serve flags]   head machine: pdserve against the cluster
#   deploy/ray/cluster.sh drain GATEWAY_URL         a worker machine, before `stop`: drain its engine instances
#   deploy/ray/cluster.sh stop                      any machine: `ray stop` (every Ray process there)
#
# Workers advertise their GPUs and CPUs and a custom resource per role
# (pdserve_prefill / pdserve_decode, one per engine instance the machine holds)
# for per-pool placement. Settings (environment):
#   PDSERVE_CONFIG         config file for `serve` (default: deploy/ray/pdserve.yaml)
#   RAY_PORT               head's GCS port (default 6379)
#   NUM_GPUS, NUM_CPUS     what a worker gives Ray (default: Ray detects them)
#   INSTANCES              engine instances a worker holds (default 1)
#   METRICS_PORT           Ray's metrics port on this node (default 8080)
#   NODE_IP                address this node advertises (e.g. 127.0.0.2 for a second node on one machine)
#   PDSERVE_API_KEY        for `drain`: the gateway's API key; DRAIN_DEADLINE its limit in s (600);
#                          PYTHON the interpreter of the pdserve install (default python)
#   RAY_AUTH_TOKEN         Ray's token auth, the same secret on every machine; without it
#                          set RAY_AUTH_MODE=disabled explicitly (one trusted host or network only)
#   DRY_RUN=1              print the commands instead of running them
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${RAY_PORT:-6379}"

# Ray starts workers at niceness 15 by default: the engines (Ray actors) would lose their cores to any
# other process on the machine. pdserve serves at normal priority, as vLLM's own server does.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"

run() {
  if [[ "${DRY_RUN:-}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

auth() {
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    export RAY_AUTH_MODE=token
  elif [[ "${RAY_AUTH_MODE:-}" != disabled ]]; then
    echo "cluster.sh: set RAY_AUTH_TOKEN (same on every machine) or RAY_AUTH_MODE=disabled" >&2
    exit 2
  fi
}

node_args=()
[[ -n "${NODE_IP:-}" ]] && node_args+=(--node-ip-address "$NODE_IP")

cmd="${1:-}"
shift || true
case "$cmd" in
  head)
    auth
    run ray start --head --port "$port" --num-cpus 0 --num-gpus 0 --metrics-export-port "${METRICS_PORT:-8080}" \
      --dashboard-host 0.0.0.0 --disable-usage-stats "${node_args[@]}"
    ;;
  worker)
    role="${1:?role: prefill or decode}"
    address="${2:?head address, e.g. 10.0.0.1:6379}"
    [[ "$role" == prefill || "$role" == decode ]] || { echo "cluster.sh: role must be prefill or decode" >&2; exit 2; }
    auth
    args=(--address "$address" --metrics-export-port "${METRICS_PORT:-8080}" --disable-usage-stats
          --resources "{\"pdserve_$role\": ${INSTANCES:-1}}")
    [[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
    [[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
    run ray start "${args[@]}" "${node_args[@]}"
    ;;
  serve)
    auth
    run pdserve serve --config "${PDSERVE_CONFIG:-$here/pdserve.yaml}" --address auto "$@"
    ;;
  drain)
    gateway="${1:?gateway URL, e.g. http://10.0.0.1:8000}"
    # This node's Ray address, as the gateway's /admin/instances reports it (node_ip).
    ip="${NODE_IP:-$("${PYTHON:-python}" -c 'import ray.util; print(ray.util.get_node_ip_address())')}"
    run "${PYTHON:-python}" "$(dirname "$here")/drain_node.py" --gateway "$gateway" --node-ip "$ip" --deadline "${DRAIN_DEADLINE:-600}"
    ;;
  stop)
    run ray stop
    ;;
  *)
    sed -n '2,25p' "$0" | grep '^#'
    exit 2
    ;;
esac
