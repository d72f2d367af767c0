// A real OpenID provider (panva's oidc-provider) on 127.0.0.1 for the tests. Configuration
// comes as JSON on the command line: {"clients": [...], "rotate": true, "routes": {...},
// "api": "/path/"}: the routes (oidc-provider's names) move endpoints to a vendor's paths, and
// requests under "api" are answered as an API that takes this provider's tokens. Prints the port.
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

const config = JSON.parse(process.argv[2] || '{}');
const server = createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: config.clients || [],
  ...(config.routes ? { routes: config.routes } : {}),
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
  },
  scopes: ['openid', 'offline_access', 'email', 'profile'],
  claims: { email: ['email', 'email_verified'], profile: ['name'] },
  rotateRefreshToken: () => config.rotate !== false,
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  pkce: { required: () => false },
  ttl: { AccessToken: config.accessTokenTtl || 3600, DeviceCode: 600 },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: `${id}@example.test`, email_verified: true, name: `User ${id}` };
      },
    };
  },
  cookies: { keys: ['test-only-cookie-key-0123456789'] },
});
provider.proxy = false;

// Token endpoint successes by grant type, for the tests to count requests: GET /__stats.
const granted = {};
provider.on('grant.success', (ctx) => {
  const type = ctx.oidc.params.grant_type;
  granted[type] = (granted[type] || 0) + 1;
});
const callback = provider.callback();
// An API on the same host (the paths under config.api) that takes the tokens this provider
// issued and answers which one it was: {"token_id": ..., "client_id": ..., "sub": ...}.
async function api(req, res) {
  const value = (req.headers.authorization || '').replace(/^Bearer /, '');
  const token = value
    ? (await provider.AccessToken.find(value)) || (await provider.ClientCredentials.find(value))
    : undefined;
  res.setHeader('content-type', 'application/json');
  if (!token) {
    res.statusCode = 401;
    res.end(JSON.stringify({ error: 'invalid_token' }));
    return;
  }
  res.end(JSON.stringify({ token_id: token.jti, client_id: token.clientId, sub: token.accountId || null }));
}
server.on('request', (req, res) => {
  if (config.api && req.url.startsWith(config.api)) {
    api(req, res).catch(() => { res.statusCode = 500; res.end(); });
    return;
  }
  if (req.url === '/__stats') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ granted }));
    return;
  }
  callback(req, res);
});
process.stdout.write(`${port}\n`);
