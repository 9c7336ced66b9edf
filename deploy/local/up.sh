#!/usr/bin/env bash
# README command 1: set up and run the whole pipeline locally (Kafka, PostgreSQL,
# migrations, collector, worker), then print where to send events and how to query them.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/bootstrap.sh
.venv/bin/pipeline stack up
eval "$(.venv/bin/pipeline stack env)"
SITE=${STACK_DEMO_SITE:-00000000-0000-4000-8000-000000000001}
cat <<INFO

The pipeline is running. Logs: .stack/logs/ (collector, workers), .stack/kafka/, .stack/postgres/.
A demo site exists: site_id=$SITE
Open the demo website (it loads the snippet from the collector, /t.js):
  ${COLLECTOR_URL%${COLLECTOR_PATH_PREFIX:-}}/demo/${COLLECTOR_PATH_PREFIX:+?collector=$COLLECTOR_URL}
Click around, then see its rows (about 1 s later):
  psql "$DATABASE_URL" -c "SELECT created_at, event_type, page_url, duration_seconds, custom_data FROM visitor_events WHERE site_id = '$SITE' ORDER BY created_at DESC LIMIT 20"

Send a page view (tracking pixel) and a click (beacon):
  curl -s -o /dev/null -w '%{http_code}\n' "$COLLECTOR_URL/t.gif?site_id=$SITE&visitor_id=v1&page_url=https://example.com/"
  curl -s -w '%{http_code}\n' -H 'Content-Type: application/json' -d '{"site_id":"$SITE","event_type":"click","visitor_id":"v1"}' "$COLLECTOR_URL/collect"

See them in Kafka:       .venv/bin/pipeline tail --from-beginning --max 5 --kafka-bootstrap $KAFKA_BOOTSTRAP
Query them (about 1 s later):
  psql "$DATABASE_URL" -c 'SELECT created_at, event_type, visitor_id, session_id, device_type, country FROM visitor_events ORDER BY created_at DESC LIMIT 10'

Environment for scripts: eval "\$(.venv/bin/pipeline stack env)"
Status / stop:           .venv/bin/pipeline stack status  |  .venv/bin/pipeline stack down
INFO
