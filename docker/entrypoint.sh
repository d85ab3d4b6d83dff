#!/bin/sh
# ditstream container entrypoint: the first argument picks the role.
#   serve [opts]    the API (a gateway when DITSTREAM_REDIS_URL is set, else all-in-one)
#   worker [opts]   an engine serving jobs and streams from Redis (DITSTREAM_REDIS_URL)
#   anything else   run as a ditstream subcommand (build-engine, bench, generate, ...)
# Configuration is by environment (DITSTREAM_*); secrets may come from files: for NAME in
# API_KEYS and REDIS_URL, DITSTREAM_<NAME>_FILE=/run/secrets/... is read into DITSTREAM_<NAME>.
set -eu

for name in API_KEYS REDIS_URL; do
  file_var="DITSTREAM_${name}_FILE"
  eval "file=\${$file_var:-}"
  if [ -n "$file" ]; then
    if [ ! -r "$file" ]; then
      echo "entrypoint: $file_var=$file is not readable" >&2
      exit 2
    fi
    eval "export DITSTREAM_${name}=\"\$(cat \"\$file\")\""
  fi
done

role="${1:-serve}"
[ "$#" -gt 0 ] && shift
case "$role" in
  serve)
    exec ditstream serve "$@" ;;
  worker)
    exec ditstream worker "$@" ;;
  *)
    exec ditstream "$role" "$@" ;;
esac
