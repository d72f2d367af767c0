// A real OpenID provider (panva's oidc-provider) on 127.0.0.1 for the tests. Configuration
// comes as JSON on the command line: {"clients": [...], "rotate": true}. Prints the port.
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

const config = JSON.parse(process.argv[2] || '{}');
const server = createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: config.clients || [],
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
server.on('request', (req, res) => {
  if (req.url === '/__stats') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ granted }));
    return;
  }
  callback(req, res);
});
process.stdout.write(`${port}\n`);
