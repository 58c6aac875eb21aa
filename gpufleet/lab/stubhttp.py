"""The part of the lab's busybox HTTP stand-ins (openai-stub, router-stub) that reads one request: a shell
fragment run by each stand-in per connection (behind busybox `nc -ll -e`). It sets `method`, `path` (as sent,
with any query), `len` and `body` (CR and LF removed), and defines `field NAME [last]`: the first (or last)
string value of NAME in the JSON body, read with grep and sed (no escaped quotes in it), enough for tests."""

READ_REQUEST = r"""cr=$(printf '\r')
read -r line || exit 0
line=${line%"$cr"}
method=${line%% *}
path=${line#* }
path=${path%% *}
len=0
while read -r h; do
  h=${h%"$cr"}
  [ -z "$h" ] && break
  case "$(echo "$h" | tr A-Z a-z)" in
    content-length:*) len=$(echo "${h#*:}" | tr -dc 0-9) ;;
  esac
done
body=""
[ "${len:-0}" -gt 0 ] && body=$(head -c "$len" | tr -d '\r\n')
field() {  # the first string value of field $1 in the body (the last one with `last`)
  printf '%s' "$body" | grep -o '"'"$1"'"[[:space:]]*:[[:space:]]*"[^"]*"' | if [ "${2:-}" = last ]; then tail -n 1; \
    else head -n 1; fi | sed 's/^"[^"]*"[[:space:]]*:[[:space:]]*"//; s/"$//'
}
"""
