// A real, certified OAuth 2.0 authorization server (panva's oidc-provider) for
// consent-proxy's integration test `tests/integration/external/oidc_provider.rs`.
//
//   node tests/oidc/server.mjs [PORT]      (PORT, or $PORT, default 0 = any free port)
//
// Listens on 127.0.0.1, then prints `LISTENING <port>` on stdout once it serves requests.
// Issuer: http://127.0.0.1:<port>. Endpoints: POST /token (client credentials),
// POST /token/introspection. Exits when stdin closes (so it never outlives the test that
// spawned it), and on SIGTERM/SIGINT.
//
// Clients (secrets are test fixtures, not secrets):
//   consent-proxy-basic  client_secret_basic
//   consent-proxy-post   client_secret_post
//   consent-proxy-jwt    private_key_jwt (ES256), when $OIDC_JWT_CLIENT_JWK holds its public
//                        key as a JWK (JSON)
// Access-token lifetime: $OIDC_TOKEN_TTL_S seconds (default 600).
//
// Install its dependency first: npm ci --prefix tests/oidc
// oidc-provider is pinned to the 8.x line: 9.x declares Node 22+ (it warns "Unsupported
// runtime" on Node 20, which is what the project's machines have).

import http from 'node:http';

import Provider from 'oidc-provider';

const SCOPES = ['voicebiometrics-consent:read', 'voicebiometrics-consent:write'];
const CLIENTS = {
  basic: { id: 'consent-proxy-basic', secret: 'basic-secret-0123456789abcdef' },
  post: { id: 'consent-proxy-post', secret: 'post-secret-0123456789abcdef' },
};

const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`invalid port: ${process.argv[2] ?? process.env.PORT}`);
  process.exit(2);
}
const tokenTtl = Number(process.env.OIDC_TOKEN_TTL_S ?? 600);
if (!Number.isInteger(tokenTtl) || tokenTtl < 1) {
  console.error(`invalid OIDC_TOKEN_TTL_S: ${process.env.OIDC_TOKEN_TTL_S}`);
  process.exit(2);
}

const jwtClientJwk = process.env.OIDC_JWT_CLIENT_JWK
  ? JSON.parse(process.env.OIDC_JWT_CLIENT_JWK)
  : null;

const client = (id, secret, method) => ({
  client_id: id,
  client_secret: secret,
  grant_types: ['client_credentials'],
  token_endpoint_auth_method: method,
  redirect_uris: [],
  response_types: [],
  scope: SCOPES.join(' '),
});

// The issuer must carry the port, so bind first and build the provider once it is known.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
const { port: actualPort } = server.address();

const provider = new Provider(`http://127.0.0.1:${actualPort}`, {
  clients: [
    client(CLIENTS.basic.id, CLIENTS.basic.secret, 'client_secret_basic'),
    client(CLIENTS.post.id, CLIENTS.post.secret, 'client_secret_post'),
    ...(jwtClientJwk
      ? [{
        client_id: 'consent-proxy-jwt',
        grant_types: ['client_credentials'],
        token_endpoint_auth_method: 'private_key_jwt',
        token_endpoint_auth_signing_alg: 'ES256',
        jwks: { keys: [jwtClientJwk] },
        redirect_uris: [],
        response_types: [],
        scope: SCOPES.join(' '),
      }]
      : []),
  ],
  scopes: SCOPES,
  cookies: { keys: ['test-only-cookie-key-not-a-secret'] },
  features: {
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    devInteractions: { enabled: false },
  },
  ttl: {
    ClientCredentials: () => tokenTtl,
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

server.on('request', provider.callback());
console.log(`LISTENING ${actualPort}`);

const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();
