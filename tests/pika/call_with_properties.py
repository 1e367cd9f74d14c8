#!/usr/bin/env python3
"""A pika client that sends one request with headers and every property a caller can set.

Usage: call_with_properties.py URL QUEUE. Sends the body "hello" with headers x-echo-color
(str), x-number (int), x-flag (bool) and plain (str), and the properties content_type,
content_encoding, correlation_id, message_id, type, app_id, user_id and timestamp. Prints one
JSON object: the request's "correlation_id" and the reply's "body" (text), "headers" (each
value as str) and "content_type". Exits 1 after 10 s without a reply.
"""
import json
import sys
import time

import pika

from peer import call

url, queue = sys.argv[1], sys.argv[2]
reply = call(
    url,
    queue,
    b"hello",
    headers={"x-echo-color": "blue", "x-number": 42, "x-flag": True, "plain": "text"},
    content_type="text/plain",
    content_encoding="utf-8",
    message_id="message-1",
    type="greeting",
    app_id="pika-peer",
    user_id=pika.URLParameters(url).credentials.username,
    timestamp=int(time.time()),
)
print(json.dumps(reply), flush=True)
