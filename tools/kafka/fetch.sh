#!/usr/bin/env bash
# Fetch the Apache Kafka broker's runtime jars from Maven Central into one directory.
#
#   tools/kafka/fetch.sh [DEST]     (default DEST: <repo>/.cache/kafka/libs)
#
# The jar list is tools/kafka/pom.xml.  Idempotent: DEST holds a stamp (.fetched) with the
# pom's checksum, and nothing is done while it matches.  The copy goes to a temporary
# directory that replaces DEST only when complete, so an interrupted run leaves no half
# directory behind.  Quiet unless it fails; then Maven's output goes to stderr.
# Needs `mvn` (Debian: apt-get install -y maven) and a JDK (the tests run `java` from it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
pom="$here/pom.xml"
dest="${1:-$root/.cache/kafka/libs}"
dest="${dest%/}"
stamp_name=".fetched"

want="$(sha256sum "$pom" | cut -d' ' -f1)"
if [[ -f "$dest/$stamp_name" && "$(cat "$dest/$stamp_name")" == "$want" ]]; then
    exit 0
fi

if ! command -v mvn >/dev/null 2>&1; then
    echo "tools/kafka/fetch.sh: mvn not found; install Maven (apt-get install -y maven)" >&2
    exit 1
fi

mkdir -p "$(dirname "$dest")"
tmp="$(mktemp -d "$dest.tmp.XXXXXX")"
chmod 755 "$tmp"
log="$(mktemp)"
cleanup() { rm -rf "$tmp" "$log"; }
trap cleanup EXIT

if ! mvn -q -B -f "$pom" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime >"$log" 2>&1; then
    echo "tools/kafka/fetch.sh: fetching the Kafka jars with Maven failed:" >&2
    cat "$log" >&2
    exit 1
fi

if ! compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null; then
    echo "tools/kafka/fetch.sh: Maven succeeded but no kafka_2.13 jar is in $tmp" >&2
    ls -l "$tmp" >&2
    exit 1
fi

echo "$want" >"$tmp/$stamp_name"
rm -rf "$dest"
mv "$tmp" "$dest"
