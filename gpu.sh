#!/usr/bin/env bash
# The one-GPU study: study.sh at its gpu scale (bash study.sh --help), with the same options.
exec bash "$(dirname "$0")/study.sh" --scale gpu "$@"
