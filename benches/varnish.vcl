vcl 4.1;

# Varnish in front of the Talkdesk simulator, for benches/compare.sh (target d).
# A template: compare.sh replaces the @NAME@ placeholders and runs varnishd pinned to the
# server core with -s malloc.

backend talkdesk {
    .host = "127.0.0.1";
    .port = "@BACKEND_PORT@";
}

sub vcl_recv {
    if (req.method != "GET" || req.url !~ "^/voicebiometrics/contacts/[^/]+/consent$") {
        return (synth(404));
    }
    # Cache on the path alone, whatever the caller sends (the builtin VCL would pass any
    # request that carries an Authorization header or a cookie).
    unset req.http.Cookie;
    return (hash);
}

sub vcl_hash {
    hash_data(req.url);
    return (lookup);
}

sub vcl_backend_fetch {
    # The proxy's token, added on the way to the backend only.
    set bereq.http.Authorization = "Bearer @TOKEN@";
}

sub vcl_backend_response {
    if (beresp.status == 200 || beresp.status == 404) {
        # Cache despite the Authorization header on the backend request, for a day.
        set beresp.ttl = 1d;
        set beresp.grace = 0s;
        unset beresp.http.Set-Cookie;
        return (deliver);
    }
    set beresp.uncacheable = true;
    set beresp.ttl = 0s;
    return (deliver);
}

sub vcl_deliver {
    if (obj.hits > 0) {
        set resp.http.X-Cache-Status = "HIT";
    } else {
        set resp.http.X-Cache-Status = "MISS";
    }
}
