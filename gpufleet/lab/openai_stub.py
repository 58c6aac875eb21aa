"""openai-stub: a tiny OpenAI-compatible model server in the lab's image (/usr/bin/openai-stub), a stand-in
for vLLM, SGLang or TGI behind a service with `model` (real tokens are not the point).

    openai-stub --model NAME [--port 8000] [--prefix /v1] [--delay 0.3] [--mode prefill|decode] [--bootstrap-port 8998]

It is a busybox shell script behind busybox `nc -ll -e` (the image has no Python): one process per
connection, one request per connection (`Connection: close`). It answers

- `GET PREFIX/models`: OpenAI's list with its one model;
- `POST PREFIX/chat/completions`: a `chat.completion` whose message is `echo: ` + the last `content` of the
  request (its last message); with `"stream": true`, server-sent events: one `chat.completion.chunk` per
  word, DELAY seconds apart, then `data: [DONE]`;
- `POST PREFIX/completions`: a `text_completion` echoing `prompt`;
- a request for another model: 404 with OpenAI's `model_not_found` error, as vLLM does;
- `GET /health`: 200; `GET /server_info`: SGLang's shape, `{"status": "ready"}` with, given `--mode`, its
  `disaggregation_mode` (and a prefill's `disaggregation_bootstrap_port`): a prefill or decode worker of a
  router service (gpufleet.router).

Each answer's `system_fingerprint` is `MODE@HOSTNAME` (`regular` without `--mode`): which worker answered.

The JSON is read with sed (a field's first string value; no escaped quotes in it), enough for tests.
"""

from gpufleet.lab.stubhttp import READ_REQUEST

OPENAI_STUB = r"""#!/bin/sh
# gpufleet-lab-standin: openai-stub, a tiny OpenAI-compatible model server (gpufleet.lab.openai_stub).
set -f  # the words of a message are never file patterns
if [ "${1:-}" != "--connection" ]; then
  model=stub port=8000 prefix=/v1 delay=0.3 mode=regular bootstrap=8998
  while [ $# -gt 0 ]; do
    case "$1" in
      --model) model=$2; shift 2 ;;
      --port) port=$2; shift 2 ;;
      --prefix) prefix=$2; shift 2 ;;
      --delay) delay=$2; shift 2 ;;
      --mode) mode=$2; shift 2 ;;
      --bootstrap-port) bootstrap=$2; shift 2 ;;
      *) echo "openai-stub: unknown argument $1 (openai-stub --model NAME [--port P] [--prefix /v1] [--delay S])" >&2
         exit 2 ;;
    esac
  done
  echo "openai-stub: model $model on port $port at $prefix" >&2
  exec nc -ll -p "$port" -e "$0" --connection "$model" "${prefix%/}" "$delay" "$mode" "$bootstrap"
fi
served=$2 prefix=$3 delay=$4 mode=$5 bootstrap=$6
""" + READ_REQUEST + r"""path=${path%%\?*}  # the query is not read
reply() {  # STATUS CONTENT-TYPE BODY
  printf 'HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
    "$1" "$2" "${#3}" "$3"
}
error() {  # STATUS MESSAGE CODE
  reply "$1" application/json \
    "{\"error\":{\"message\":\"$2\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"$3\"}}"
}
now=$(date +%s)
model=$(field model)
echo "openai-stub: $method $path model=${model:--}" >&2
head_of() {  # the start of a response object of type $1
  printf '{"id":"stub-%s","object":"%s","created":%s,"model":"%s","system_fingerprint":"%s@%s"' "$$" "$1" "$now" \
    "$served" "$mode" "$(hostname)"
}
chunk() {  # one server-sent event: a chat.completion.chunk with delta $1 and finish_reason $2
  printf 'data: %s,"choices":[{"index":0,"delta":%s,"finish_reason":%s}]}\n\n' \
    "$(head_of chat.completion.chunk)" "$1" "$2"
}
case "$method $path" in
  "GET /health")
    reply "200 OK" application/json '{"status":"ok"}' ;;
  "GET /server_info")
    case "$mode" in
      prefill) info='{"status":"ready","disaggregation_mode":"prefill","disaggregation_bootstrap_port":'
               reply "200 OK" application/json "$info$bootstrap}" ;;
      decode) reply "200 OK" application/json '{"status":"ready","disaggregation_mode":"decode"}' ;;
      *) reply "200 OK" application/json '{"status":"ready","disaggregation_mode":"null"}' ;;
    esac ;;
  "GET $prefix/models")
    m="{\"id\":\"$served\",\"object\":\"model\",\"created\":$now,\"owned_by\":\"openai-stub\"}"
    reply "200 OK" application/json "{\"object\":\"list\",\"data\":[$m]}" ;;
  "POST $prefix/chat/completions"|"POST $prefix/completions")
    if [ "$model" != "$served" ]; then
      error "404 Not Found" "The model \`$model\` does not exist." model_not_found
      exit 0
    fi
    if [ "$path" = "$prefix/completions" ]; then
      choice="{\"index\":0,\"text\":\"echo: $(field prompt)\",\"finish_reason\":\"stop\"}"
      reply "200 OK" application/json "$(head_of text_completion),\"choices\":[$choice]}"
      exit 0
    fi
    text="echo: $(field content last)"
    if printf '%s' "$body" | grep -q '"stream"[[:space:]]*:[[:space:]]*true'; then
      printf 'HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n'
      printf 'Connection: close\r\n\r\n'
      for word in $text; do
        chunk "{\"content\":\"$word \"}" null
        sleep "$delay"
      done
      chunk "{}" '"stop"'
      printf 'data: [DONE]\n\n'
    else
      n=$(echo "$text" | wc -w)
      choice="{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"$text\"},\"finish_reason\":\"stop\"}"
      usage="{\"prompt_tokens\":$n,\"completion_tokens\":$n,\"total_tokens\":$((n + n))}"
      reply "200 OK" application/json "$(head_of chat.completion),\"choices\":[$choice],\"usage\":$usage}"
    fi ;;
  *)
    error "404 Not Found" "openai-stub serves GET $prefix/models, POST $prefix/chat/completions and POST \
$prefix/completions, not $method $path" unknown_url ;;
esac
"""
