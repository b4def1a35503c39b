"""Scrapes ivrguard's /metrics as Prometheus would and as other scrapers do,
and reads each body with the official Python client's parser for its format.

Usage: scrape_metrics.py HOST:PORT
Prints JSON: for "openmetrics" and "text", the Content-Type answered and
every metric family the parser read: its type and its samples
([name, labels, value]). A body the parser refuses is an error (exit 1).
"""

import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def scrape(address, accept):
    request = urllib.request.Request(f"http://{address}/metrics")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers.get("Content-Type"), response.read().decode("utf-8")


def families(parsed):
    return {
        family.name: {
            "type": family.type,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
        for family in parsed
    }


def main():
    address = sys.argv[1]
    out = {}
    for name, accept, parse in [
        ("openmetrics", PROMETHEUS_ACCEPT, parse_openmetrics),
        ("text", None, parse_text),
    ]:
        content_type, body = scrape(address, accept)
        out[name] = {"content_type": content_type, "families": families(parse(body))}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
