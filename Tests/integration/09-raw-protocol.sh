#!/bin/bash
# Raw-socket protocol checks (Tests/integration/09-raw-protocol.py): handshake and transmission
# flags, unknown options/commands/flags, LIST/INFO/GO/EXPORT_NAME/ABORT, meta contexts, DF and
# REQ_ONE, FLUSH with offset, oversized writes, bad magic and truncated handshakes.
. "$(dirname "$0")/lib.sh"

serve_unix mem --memory 64M
serve_unix named --memory 8M --export-name disk1 --description "raw test disk"
PY_TIMEOUT=200 py "$(sock mem)" "$(sock named)" < "$IT_DIR/09-raw-protocol.py"
assert_alive mem
assert_alive named
pass
