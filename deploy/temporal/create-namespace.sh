#!/bin/sh
# Registers the namespace the API and workers use, and the JobId and RenderStage Keyword search
# attributes they query and upsert. Safe to run again: whatever exists is left as it is.
# Env: TEMPORAL_ADDRESS (host:port), TEMPORAL_NAMESPACE, TEMPORAL_NAMESPACE_RETENTION.
set -eu

namespace=${TEMPORAL_NAMESPACE:-default}
retention=${TEMPORAL_NAMESPACE_RETENTION:-7d}
export TEMPORAL_ADDRESS="${TEMPORAL_ADDRESS:-temporal:7233}"

# The server's port opens before its services have joined the ring; wait (bounded) for health.
attempt=0
until temporal operator cluster health >/dev/null 2>&1; do
    attempt=$((attempt + 1))
    if [ "$attempt" -ge 60 ]; then
        echo "Temporal at $TEMPORAL_ADDRESS is not healthy after 60 attempts" >&2
        temporal operator cluster health
        exit 1
    fi
    sleep 2
done

if temporal operator namespace describe --namespace "$namespace" >/dev/null 2>&1; then
    echo "namespace $namespace exists"
else
    temporal operator namespace create --namespace "$namespace" --retention "$retention"
    echo "namespace $namespace created (retention $retention)"
fi

# A namespace just created reaches every frontend's cache within seconds; until then, calls
# naming it fail with "namespace not found".
attempt=0
until temporal operator search-attribute list --namespace "$namespace" >/dev/null 2>&1; do
    attempt=$((attempt + 1))
    if [ "$attempt" -ge 30 ]; then
        temporal operator search-attribute list --namespace "$namespace"
        exit 1
    fi
    sleep 1
done

for name in JobId RenderStage; do
    if temporal operator search-attribute list --namespace "$namespace" | grep -qw "$name"; then
        echo "search attribute $name exists"
    else
        temporal operator search-attribute create --namespace "$namespace" \
            --name "$name" --type Keyword
        echo "search attribute $name created"
    fi
done
