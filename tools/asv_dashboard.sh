#!/usr/bin/env bash
# Publish the asv dashboard so that it works offline: `asv publish` writes pages that load jQuery,
# flot, bootstrap, stupidtable and md5 from CDNs, and without them the page is blank. This fetches
# the same libraries from the npm registry once (cached in .asv/vendor-cache) and points the pages
# at local copies in .asv/html/vendor. With no results to publish it fails, saying what to run.
# Usage: tools/asv_dashboard.sh [CONFIG]   (default asv.conf.json)   then: asv preview, and
# python tools/check_dashboard.py to see the pages in headless chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-asv.conf.json}
# results_dir and html_dir of the config (asv's JSON allows // comments)
read -r results html < <(python3 - "$config" <<'PY'
import json, re, sys
conf = json.loads(re.sub(r"^\s*//.*$", "", open(sys.argv[1]).read(), flags=re.MULTILINE))
print(conf.get("results_dir", "results"), conf.get("html_dir", "html"))
PY
)
commits=$( { find "$results" -mindepth 2 -maxdepth 2 -name '*.json' ! -name machine.json -exec basename {} \; \
             2>/dev/null || true; } | cut -d- -f1 | sort -u | wc -l)
if [ "$commits" -eq 0 ]; then
    echo "asv_dashboard: no benchmark results in $results to publish: run asv first, e.g. docs/speed.md's" \
         "asv run --steps 20 ... (asv run --quick saves none)" >&2
    exit 2
fi
asv publish --config "$config"
[ "$commits" -gt 1 ] || echo "asv_dashboard: only one commit has results, so every graph is a single point:" \
                            "benchmark more commits (see docs/speed.md)" >&2
cache=.asv/vendor-cache
vendor=$html/vendor
mkdir -p "$cache" "$vendor"
packages=(jquery@3.3.1 flot@0.8.3 flot-orderbars@1.0.0 stupid-table-plugin@1.1.3 blueimp-md5@2.19.0 bootstrap@3.1.1)
for package in "${packages[@]}"; do
    folder="$cache/${package/@/-}"
    if [ ! -d "$folder" ]; then
        tarball=$(cd "$cache" && npm pack --silent "$package")
        mkdir -p "$folder" && tar -xzf "$cache/$tarball" -C "$folder" --strip-components=1
    fi
done
cp "$cache"/jquery-3.3.1/dist/jquery.min.js "$cache"/flot-0.8.3/jquery.flot{,.time,.selection,.categories}.js \
   "$cache"/flot-orderbars-1.0.0/js/jquery.flot.orderBars.js "$cache"/stupid-table-plugin-1.1.3/stupidtable.min.js \
   "$cache"/blueimp-md5-2.19.0/js/md5.min.js "$cache"/bootstrap-3.1.1/dist/js/bootstrap.min.js \
   "$cache"/bootstrap-3.1.1/dist/css/bootstrap.min.css "$vendor"/
python3 - "$html" <<'PY'
import pathlib, re, sys
# CDN file name -> local copy (the unminified flot files stand in for their .min twins)
local = {"jquery-3.3.1.min.js": "jquery.min.js", "jquery.flot.min.js": "jquery.flot.js",
         "jquery.flot.time.min.js": "jquery.flot.time.js", "jquery.flot.selection.min.js": "jquery.flot.selection.js",
         "jquery.flot.categories.min.js": "jquery.flot.categories.js"}
cdn = re.compile(r'(src|href)="https://[^"]+/([^"/]+\.(?:js|css))"')
for page in pathlib.Path(sys.argv[1]).glob("*.html"):
    text = page.read_text()
    text = cdn.sub(lambda m: f'{m[1]}="vendor/{local.get(m[2], m[2])}"', text)
    text = re.sub(r'\s+integrity="[^"]*"', "", text)  # the local files are not byte-identical to the CDN's
    page.write_text(text)
left = [p.name for p in pathlib.Path(sys.argv[1]).glob("*.html") if cdn.search(p.read_text())]
print(f"dashboard ready in {sys.argv[1]}" + (f" (still remote scripts in {left})" if left else ", no remote scripts left"))
PY
