#!/usr/bin/env bash
# Checks the monitoring kit in packaging/monitoring/:
#   - promtool check rules / check config / test rules (alerts.yml,
#     prometheus.yml, alerts_test.yml);
#   - the Grafana dashboard is valid JSON, and each of its PromQL queries
#     parses (checked by promtool as a recording rule);
#   - every tandem_* metric named in alerts.yml, alerts_test.yml and the
#     dashboard is listed in docs/metrics.md (after dropping a histogram's
#     _bucket/_sum/_count suffix);
#   - every alert has `for`, a severity label and summary, description and
#     runbook annotations; when docs/operations.md exists, every runbook
#     anchor names one of its headings.
# Installs promtool (Debian package prometheus) when it is missing and this
# runs as root. Needs python3 (with PyYAML for the alert checks, Debian
# package python3-yaml).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=packaging/monitoring
metrics_doc=docs/metrics.md
operations_doc=docs/operations.md

if ! command -v promtool >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
        echo "installing promtool (Debian package prometheus)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        # The package starts a Prometheus server; only promtool is needed.
        if command -v systemctl >/dev/null 2>&1; then
            systemctl disable --now prometheus >/dev/null 2>&1 || true
        fi
    else
        echo "check-monitoring: promtool is missing. Install it as root with" >&2
        echo "  apt-get install -y --no-install-recommends prometheus" >&2
        echo "(or run scripts/install-test-deps.sh, or this script as root)." >&2
        exit 1
    fi
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "check-monitoring: python3 is missing (apt-get install python3)" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== promtool check rules"
promtool check rules "$dir/alerts.yml"
echo "== promtool check config"
promtool check config "$dir/prometheus.yml"
echo "== promtool test rules"
promtool test rules "$dir/alerts_test.yml"

echo "== dashboard JSON"
python3 -m json.tool "$dir/grafana-dashboard.json" >/dev/null
echo "  SUCCESS: $dir/grafana-dashboard.json is valid JSON"

echo "== dashboard queries"
# Every query of the dashboard (panels, rows, annotations, variables), with
# Grafana's variables replaced, as a recording rule promtool can parse.
python3 - "$dir/grafana-dashboard.json" "$tmp/dashboard-rules.yml" <<'EOF'
import json, sys

dash = json.load(open(sys.argv[1]))
exprs = []

def walk(node, where):
    if isinstance(node, dict):
        title = node.get("title", where)
        if isinstance(node.get("expr"), str):
            exprs.append((title, node["expr"]))
        for key, value in node.items():
            walk(value, title)
    elif isinstance(node, list):
        for value in node:
            walk(value, where)

walk(dash.get("panels", []), "panel")
walk(dash.get("annotations", {}), "annotation")
for var in dash.get("templating", {}).get("list", []):
    query = var.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    if var.get("type") == "query" and isinstance(query, str):
        # label_values(metric, label) is Grafana's; promtool parses the metric.
        if query.startswith("label_values(") and "," in query:
            query = query[len("label_values("):].rsplit(",", 1)[0]
        exprs.append(("variable " + var["name"], query))

subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$host": ".*"}
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, expr) in enumerate(exprs):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        if "$" in expr:
            sys.exit(f"dashboard: unknown variable in the query of {title!r}: {expr}")
        out.write(f"      - record: dashboard_query_{i}\n")
        out.write(f"        expr: {json.dumps(expr)}\n")
print(f"  {len(exprs)} queries")
EOF
promtool check rules "$tmp/dashboard-rules.yml" >/dev/null
echo "  SUCCESS: every dashboard query parses"

echo "== metric names against $metrics_doc"
grep -o '`tandem_[a-z_]*`' "$metrics_doc" | tr -d '`' | sort -u >"$tmp/documented"
# A match ending in "_" is a prefix in prose ("the tandem_job_* metrics").
grep -oh 'tandem_[a-z_]\+' "$dir/alerts.yml" "$dir/alerts_test.yml" "$dir/grafana-dashboard.json" \
    | grep -v '_$' | sort -u >"$tmp/used"
unknown=()
while read -r name; do
    if grep -qxF "$name" "$tmp/documented"; then
        continue
    fi
    base=$(sed -E 's/_(bucket|sum|count)$//' <<<"$name")
    if grep -qxF "$base" "$tmp/documented"; then
        continue
    fi
    unknown+=("$name")
done <"$tmp/used"
if ((${#unknown[@]} > 0)); then
    echo "check-monitoring: metric names not in $metrics_doc:" >&2
    printf '  %s\n' "${unknown[@]}" >&2
    exit 1
fi
echo "  SUCCESS: $(wc -l <"$tmp/used") tandem_* names used, all documented"

echo "== alert fields and runbooks"
python3 - "$dir/alerts.yml" "$operations_doc" <<'EOF'
import os, re, sys
try:
    import yaml
except ImportError:
    sys.exit("check-monitoring: PyYAML is missing (apt-get install python3-yaml)")

rules_file, ops = sys.argv[1], sys.argv[2]
anchors = None
if os.path.exists(ops):
    anchors = set()
    in_code = False
    for line in open(ops):
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            # GitHub's heading anchors: lower case, punctuation dropped,
            # spaces to hyphens.
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)

problems = []
alerts = 0
for group in yaml.safe_load(open(rules_file))["groups"]:
    for rule in group["rules"]:
        if "alert" not in rule:
            continue
        alerts += 1
        name = rule["alert"]
        if "for" not in rule:
            problems.append(f"{name}: no `for`")
        if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            problems.append(f"{name}: severity label missing or not critical/warning/info")
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            if not ann.get(key):
                problems.append(f"{name}: no `{key}` annotation")
        runbook = ann.get("runbook", "")
        m = re.fullmatch(r"docs/operations\.md#([a-z0-9-]+)", runbook)
        if runbook and not m:
            problems.append(f"{name}: runbook {runbook!r} is not docs/operations.md#<anchor>")
        elif m and anchors is not None and m.group(1) not in anchors:
            problems.append(f"{name}: {ops} has no heading for #{m.group(1)}")
if problems:
    print("check-monitoring: alerts.yml:", file=sys.stderr)
    for p in problems:
        print("  " + p, file=sys.stderr)
    sys.exit(1)
note = "" if anchors is not None else f" ({ops} does not exist yet: runbook anchors not checked)"
print(f"  SUCCESS: {alerts} alerts, each with for, severity, summary, description, runbook{note}")
EOF

echo "monitoring kit OK"
