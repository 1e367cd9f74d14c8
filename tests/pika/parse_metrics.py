#!/usr/bin/env python3
"""Fetches a Prometheus text exposition and parses it with the prometheus_client package's own
parser, which refuses what is not valid exposition text.

Usage: parse_metrics.py URL. Prints one JSON object: each sample, as NAME{label="value",...}
with the labels sorted, to its value.
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
samples = {}
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        labels = ",".join(f'{name}="{value}"' for name, value in sorted(sample.labels.items()))
        samples[f"{sample.name}{{{labels}}}"] = sample.value
print(json.dumps(samples, sort_keys=True))
