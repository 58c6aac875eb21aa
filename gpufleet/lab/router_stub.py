"""router-stub: a stand-in for SGLang's router (its model gateway, `smg launch ...`) in the lab's image
(/usr/bin/router-stub), for a service with a `router: {type: sglang}` replica group (gpufleet.router).

    router-stub [--port 8000] [--dir /tmp/router-stub]

A busybox shell script behind busybox `nc -ll -e` (one process per connection, `Connection: close`), as
openai-stub. It keeps its workers in DIR/workers (a line each: ID URL WORKER_TYPE BOOTSTRAP_PORT) and answers
SGLang's router API as gpufleet's server uses it:

- `GET /workers`: `{"workers": [{"id", "url", "worker_type", "connection_mode": "http"[, "bootstrap_port"]}]}`;
- `POST /workers` `{"url", "worker_type"[, "bootstrap_port"]}`: 202 `{"status": "accepted", "worker_id"}`;
- `DELETE /workers/ID`: 202 `{"status": "accepted"}` (404 for an unknown ID);
- `GET /health`: 200;
- an inference path (`/v1/...`, `/generate`, `/chat/completions`): the request carried to a decode worker (else
  a regular one) at its URL, whose answer is the router's; 503 while it has none.
"""

from gpufleet.lab.stubhttp import READ_REQUEST

ROUTER_STUB = r"""#!/bin/sh
# gpufleet-lab-standin: router-stub, a stand-in for SGLang's router (gpufleet.lab.router_stub).
set -f
if [ "${1:-}" != "--connection" ]; then
  port=8000 dir=/tmp/router-stub
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port=$2; shift 2 ;;
      --dir) dir=$2; shift 2 ;;
      *) echo "router-stub: unknown argument $1 (router-stub [--port P] [--dir DIR])" >&2; exit 2 ;;
    esac
  done
  mkdir -p "$dir"
  : > "$dir/workers"
  echo "router-stub: on port $port" >&2
  exec nc -ll -p "$port" -e "$0" --connection "$dir"
fi
dir=$2
""" + READ_REQUEST + r"""number() {  # the first number value of field $1 in the body
  printf '%s' "$body" | grep -o '"'"$1"'"[[:space:]]*:[[:space:]]*[0-9]*' | head -n 1 | sed 's/.*://' | tr -dc 0-9
}
reply() {  # STATUS BODY
  printf 'HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
    "$1" "${#2}" "$2"
}
echo "router-stub: $method $path" >&2
case "$method $path" in
  "GET /health")
    reply "200 OK" '{"status":"ok"}' ;;
  "GET /workers")
    list=""
    while read -r id url kind bport; do
      w="{\"id\":\"$id\",\"url\":\"$url\",\"worker_type\":\"$kind\",\"connection_mode\":\"http\""
      [ "$bport" != "-" ] && w="$w,\"bootstrap_port\":$bport"
      list="${list:+$list,}$w}"
    done < "$dir/workers"
    reply "200 OK" "{\"workers\":[$list],\"total\":$(wc -l < "$dir/workers")}" ;;
  "POST /workers")
    url=$(field url) kind=$(field worker_type) bport=$(number bootstrap_port)
    if [ -z "$url" ]; then
      reply "400 Bad Request" '{"error":"url is required"}'
      exit 0
    fi
    id="w$(date +%s)$$"
    echo "$id $url ${kind:-regular} ${bport:--}" >> "$dir/workers"
    echo "router-stub: added $url (${kind:-regular})" >&2
    reply "202 Accepted" "{\"status\":\"accepted\",\"worker_id\":\"$id\"}" ;;
  "DELETE /workers/"*)
    id=${path#/workers/}
    if ! grep -q "^$id " "$dir/workers"; then
      reply "404 Not Found" "{\"error\":\"no worker $id\"}"
      exit 0
    fi
    grep -v "^$id " "$dir/workers" > "$dir/workers.new"
    mv "$dir/workers.new" "$dir/workers"
    echo "router-stub: removed $id" >&2
    reply "202 Accepted" '{"status":"accepted"}' ;;
  "POST /v1/"*|"GET /v1/"*|"POST /generate"|"POST /chat/completions")
    url=$(awk '$3 == "decode" {print $2; exit}' "$dir/workers")
    [ -z "$url" ] && url=$(awk '$3 == "regular" {print $2; exit}' "$dir/workers")
    if [ -z "$url" ]; then
      reply "503 Service Unavailable" '{"error":"no worker to route to"}'
      exit 0
    fi
    hostport=${url#http://}
    hostport=${hostport%%/*}
    printf '%s %s HTTP/1.0\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' \
      "$method" "$path" "$hostport" "${#body}" "$body" | nc "${hostport%:*}" "${hostport##*:}" ;;
  *)
    reply "404 Not Found" "{\"error\":\"router-stub does not serve $method $path\"}" ;;
esac
"""
