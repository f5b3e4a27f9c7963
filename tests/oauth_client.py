"""An OAuth 2.0 client that is not the project's own: Authlib's requests integration, the way a
third-party integration would use it, against consent-proxy's token endpoint.

For each client authentication method (client_secret_basic, then client_secret_post) it fetches
a token with the client credentials grant, then PUTs and GETs a contact's consent with that
token (Authlib adds the Authorization header). Prints one JSON object per method on standard
output; tests/integration/external/oauth.rs checks them. Exits non-zero, with the traceback, on any error.

Usage: oauth_client.py BASE_URL CLIENT_ID CLIENT_SECRET CONTACT_PATH_SEGMENT
"""

import json
import sys

from authlib.integrations.requests_client import OAuth2Session


def run(base_url, client_id, client_secret, contact, method, status):
    session = OAuth2Session(
        client_id,
        client_secret,
        token_endpoint_auth_method=method,
        scope="voicebiometrics-consent:read voicebiometrics-consent:write",
    )
    token = session.fetch_token(
        f"{base_url}/oauth/token", grant_type="client_credentials", timeout=10
    )
    url = f"{base_url}/voicebiometrics/contacts/{contact}/consent"
    put = session.put(url, json={"status": status}, timeout=10)
    get = session.get(url, timeout=10)
    return {
        "method": method,
        "token_type": token.get("token_type"),
        "expires_in": token.get("expires_in"),
        "scope": token.get("scope"),
        "access_token_length": len(token.get("access_token", "")),
        "put_status": put.status_code,
        "put_body": put.json(),
        "get_status": get.status_code,
        "get_body": get.json(),
        "get_cache": get.headers.get("x-cache-status"),
        "authorization_scheme": put.request.headers.get("Authorization", "").split(" ")[0],
    }


def main():
    base_url, client_id, client_secret, contact = sys.argv[1:5]
    for method, status in (
        ("client_secret_basic", "CONSENTED"),
        ("client_secret_post", "REFUSED"),
    ):
        print(json.dumps(run(base_url, client_id, client_secret, contact, method, status)))


if __name__ == "__main__":
    main()
