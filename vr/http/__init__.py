"""Serving HTTP to guests: the event worker, the HTTP/1.1 parser adapter, the gunicorn
runner, and the one place that maps a request to a VM (:mod:`vr.http.identity`)."""
