#!/usr/bin/env bash
# Publish the asv dashboard so that it works offline: `asv publish` writes pages that load jQuery,
# flot, bootstrap, stupidtable and md5 from CDNs, and without them the page is blank. This fetches
# the same libraries from the npm registry once (cached in .asv/vendor-cache) and points the pages
# at local copies in .asv/html/vendor. Usage: tools/asv_dashboard.sh   then: asv preview
set -euo pipefail
cd "$(dirname "$0")/.."
asv publish
cache=.asv/vendor-cache
vendor=.asv/html/vendor
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
python3 - .asv/html <<'PY'
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
print("dashboard ready in .asv/html" + (f" (still remote scripts in {left})" if left else ", no remote scripts left"))
PY
