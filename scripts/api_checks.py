"""Schemathesis checks of piiwall's API beyond the built-in ones (loaded by scripts/api-fuzz through
SCHEMATHESIS_HOOKS): an error body never echoes a string the request sent, and every error body is {"error": ...}."""

import json

import schemathesis


def _strings(value, found, top=False):
    """The strings a request carries as data: every string value, and the keys of objects inside values (the top
    level's keys are the API's own property names, which messages name)."""
    if isinstance(value, str):
        # Short strings ("a", "0") occur in any message by chance; what a leak looks like is longer.
        if len(value) >= 6:
            found.add(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not top:
                _strings(key, found)
            _strings(item, found)
    elif isinstance(value, list):
        for item in value:
            _strings(item, found)


def _errors(body):
    """Every error message of an answer: the body's own, and each per-token error of a reveal."""
    if not isinstance(body, dict):
        return []
    found = [body["error"]] if isinstance(body.get("error"), str) else []
    for item in body.get("values", []) if isinstance(body.get("values"), list) else []:
        if isinstance(item, dict) and isinstance(item.get("error"), str):
            found.append(item["error"])
    return found


@schemathesis.check
def no_input_echoed(ctx, response, case):
    try:
        body = json.loads(response.text)
    except ValueError:
        body = None
    sent = set()
    _strings(case.body, sent, top=True)
    for message in _errors(body):
        for value in sent:
            if value in message:
                raise AssertionError(f"an error message echoes a string of the request ({len(value)} characters)")
    if response.status_code < 400:
        return None
    if response.status_code != 405 and (not isinstance(body, dict) or not isinstance(body.get("error"), str)):
        raise AssertionError("an error body is not {\"error\": \"...\"}")
    return None
