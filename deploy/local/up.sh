#!/usr/bin/env bash
# README command 1: set up and run the whole pipeline locally
# (Kafka, PostgreSQL, migrations, collector), then print where to send events.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/bootstrap.sh
.venv/bin/pipeline stack up
eval "$(.venv/bin/pipeline stack env)"
cat <<INFO

The pipeline is running (logs in .stack/logs/, .stack/kafka/, .stack/postgres/).

Send a page view (tracking pixel):
  curl -s -o /dev/null -w '%{http_code}\n' "$COLLECTOR_URL/t.gif?site_id=00000000-0000-4000-8000-000000000001&visitor_id=v1&page_url=https://example.com/"
Send a beacon:
  curl -s -w '%{http_code}\n' -H 'Content-Type: application/json' -d '{"site_id":"00000000-0000-4000-8000-000000000001","event_type":"click","visitor_id":"v1"}' "$COLLECTOR_URL/collect"

Watch the events arrive in Kafka:
  .venv/bin/pipeline tail --from-beginning --max 5
Query PostgreSQL:
  psql "$DATABASE_URL" -c 'SELECT created_at, event_type, page_url FROM visitor_events ORDER BY created_at DESC LIMIT 10'

Environment for scripts:  eval "\$(.venv/bin/pipeline stack env)"
Status / stop:            .venv/bin/pipeline stack status  |  .venv/bin/pipeline stack down
INFO
