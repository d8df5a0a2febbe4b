// A real OpenID Connect provider (node-oidc-provider) on loopback, for Relay's single sign-on
// tests. It is a test peer, not a product: accounts sign in by e-mail address alone, and consent
// is given automatically for the registered clients.
//
// Usage:  node provider.mjs [PORT]      (PORT or $OIDC_PORT; 0 or unset: a free port)
// Prints "READY http://127.0.0.1:PORT" as the first line on stdout once it answers; the issuer
// is that URL. Logs go to stderr. Stops on SIGTERM/SIGINT, and when stdin closes if
// OIDC_EXIT_ON_STDIN_CLOSE=1 (so a test runner that dies does not leave it behind). State (codes,
// sessions, grants) lives in memory and ends with the process: the provider's warning about its
// in-memory adapter is expected.
//
// Environment:
//   OIDC_CLIENTS        JSON: one client or a list of them, each
//                       {"client_id", "client_secret", "redirect_uris": [...],
//                        "token_endpoint_auth_method"?: "client_secret_post" (default) or
//                        "client_secret_basic", "post_logout_redirect_uris"?: [...]}
//   OIDC_ACCOUNTS       JSON list of accounts, or OIDC_ACCOUNTS_FILE: a file holding it. Each
//                       {"sub", "email", "email_verified"?, "name"?, "relay_role"?, "groups"?, ...}.
//                       Claims: openid -> sub; email -> email, email_verified; profile -> name,
//                       given_name, family_name, preferred_username, relay_role, groups and any
//                       other key an account has.
//
// Interactions (the provider's interaction API, not devInteractions):
//   GET  /interaction/:uid         login prompt: an HTML form asking for the e-mail address;
//                                  consent prompt: granted at once (Grant) and resumed
//   POST /interaction/:uid/login   email=...  signs that account in (401 and the form again
//                                  for an unknown address)
//   POST /interaction/:uid/abort   the person cancels: the client gets error=access_denied

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

import Provider from 'oidc-provider';

const HOST = '127.0.0.1';

function fail(message) {
  process.stderr.write(`oidc-provider peer: ${message}\n`);
  process.exit(2);
}

function parseJson(name, text) {
  try {
    return JSON.parse(text);
  } catch (err) {
    return fail(`${name} is not valid JSON: ${err.message}`);
  }
}

function loadClients() {
  const raw = process.env.OIDC_CLIENTS;
  if (!raw) fail('OIDC_CLIENTS is not set');
  const value = parseJson('OIDC_CLIENTS', raw);
  const list = Array.isArray(value) ? value : [value];
  return list.map((c) => {
    if (!c.client_id || !c.client_secret || !Array.isArray(c.redirect_uris)) {
      fail('each client needs client_id, client_secret and redirect_uris (a list)');
    }
    return {
      client_id: String(c.client_id),
      client_secret: String(c.client_secret),
      redirect_uris: c.redirect_uris,
      post_logout_redirect_uris: c.post_logout_redirect_uris ?? [],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      // django-allauth authenticates with client_secret_post when discovery offers it.
      token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_post',
      id_token_signed_response_alg: 'RS256',
    };
  });
}

function loadAccounts() {
  let raw = process.env.OIDC_ACCOUNTS;
  if (!raw && process.env.OIDC_ACCOUNTS_FILE) {
    raw = fs.readFileSync(process.env.OIDC_ACCOUNTS_FILE, 'utf8');
  }
  if (!raw) fail('OIDC_ACCOUNTS or OIDC_ACCOUNTS_FILE is not set');
  const list = parseJson('OIDC_ACCOUNTS', raw);
  if (!Array.isArray(list)) fail('OIDC_ACCOUNTS must be a JSON list');
  const bySub = new Map();
  for (const a of list) {
    if (!a.sub || !a.email) fail('each account needs sub and email');
    bySub.set(String(a.sub), { ...a, sub: String(a.sub) });
  }
  return bySub;
}

const STANDARD_CLAIMS = new Set(['sub', 'email', 'email_verified']);
const PROFILE_CLAIMS = ['name', 'given_name', 'family_name', 'preferred_username', 'relay_role', 'groups'];

function claimsConfig(accounts) {
  const profile = new Set(PROFILE_CLAIMS);
  for (const account of accounts.values()) {
    for (const key of Object.keys(account)) {
      if (!STANDARD_CLAIMS.has(key)) profile.add(key);
    }
  }
  return {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: [...profile],
  };
}

function signingKeys() {
  // A fresh RSA key for each start: the ID tokens are RS256, verifiable against /jwks.
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { keys: [{ ...jwk, kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' }] };
}

function escapeHtml(value) {
  return String(value ?? '').replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}

function loginPage(uid, clientId, { email = '', error = '' } = {}) {
  const message = error ? `<p class="error" role="alert">${escapeHtml(error)}</p>` : '';
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Sign in - test identity provider</title></head>
<body>
<h1>Sign in</h1>
<p>Test identity provider for <strong>${escapeHtml(clientId)}</strong>.</p>
${message}
<form id="login" method="post" action="/interaction/${escapeHtml(uid)}/login">
  <label for="email">E-mail address</label>
  <input id="email" type="email" name="email" value="${escapeHtml(email)}" required autofocus>
  <button type="submit">Sign in</button>
</form>
<form id="abort" method="post" action="/interaction/${escapeHtml(uid)}/abort">
  <button type="submit">Cancel</button>
</form>
</body>
</html>
`;
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, body, type = 'text/html; charset=utf-8') {
  res.writeHead(status, {
    'Content-Type': type,
    'Cache-Control': 'no-store',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

function makeInteractions(provider, accounts) {
  const byEmail = new Map();
  for (const account of accounts.values()) byEmail.set(account.email.toLowerCase(), account);

  async function autoConsent(req, res, details) {
    // Consent for the registered client, without a page: grant what the prompt says is missing.
    const { prompt, params, session, grantId } = details;
    const grant = grantId
      ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    if (missing.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    const savedId = await grant.save();
    await provider.interactionFinished(
      req,
      res,
      { consent: { grantId: savedId } },
      { mergeWithLastSubmission: true },
    );
  }

  return async function handle(req, res, url) {
    const match = url.pathname.match(/^\/interaction\/([^/]+)(?:\/(login|abort))?$/);
    if (!match) return false;
    const [, uid, action] = match;
    const details = await provider.interactionDetails(req, res);
    if (details.uid !== uid) {
      send(res, 400, 'interaction mismatch\n', 'text/plain');
      return true;
    }
    const clientId = details.params.client_id;

    if (!action && req.method === 'GET') {
      if (details.prompt.name === 'login') {
        send(res, 200, loginPage(uid, clientId, { email: details.params.login_hint }));
      } else if (details.prompt.name === 'consent') {
        await autoConsent(req, res, details);
      } else {
        send(res, 400, `unsupported prompt ${details.prompt.name}\n`, 'text/plain');
      }
      return true;
    }
    if (action === 'login' && req.method === 'POST') {
      const form = await readForm(req);
      const email = (form.get('email') ?? '').trim();
      const account = byEmail.get(email.toLowerCase());
      if (!account) {
        send(res, 401, loginPage(uid, clientId, { email, error: 'No account with this e-mail address.' }));
        return true;
      }
      await provider.interactionFinished(
        req,
        res,
        { login: { accountId: account.sub, amr: ['pwd'] } },
        { mergeWithLastSubmission: false },
      );
      return true;
    }
    if (action === 'abort' && req.method === 'POST') {
      await readForm(req);
      await provider.interactionFinished(
        req,
        res,
        { error: 'access_denied', error_description: 'The person cancelled the sign-in.' },
        { mergeWithLastSubmission: false },
      );
      return true;
    }
    send(res, 405, 'method not allowed\n', 'text/plain');
    return true;
  };
}

function configuration(clients, accounts) {
  return {
    clients,
    jwks: signingKeys(),
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    scopes: ['openid', 'email', 'profile'],
    claims: claimsConfig(accounts),
    // Put the scope's claims in the ID token too, not only at the userinfo endpoint.
    conformIdTokenClaims: false,
    responseTypes: ['code'],
    // PKCE (S256) is checked when the client sends it (django-allauth may), not demanded.
    pkce: { methods: ['S256'], required: () => false },
    features: {
      devInteractions: { enabled: false },
      rpInitiatedLogout: { enabled: true },
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(_ctx, sub) {
      const account = accounts.get(String(sub));
      if (!account) return undefined;
      return {
        accountId: account.sub,
        async claims() {
          return { ...account };
        },
      };
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = `<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Error</title></head>
<body><h1>Sign-in error</h1>${Object.entries(out)
        .map(([k, v]) => `<p><strong>${escapeHtml(k)}</strong>: <span class="${escapeHtml(k)}">${escapeHtml(v)}</span></p>`)
        .join('')}</body></html>\n`;
    },
  };
}

function logEvents(provider) {
  const log = (event) => (ctx, err) => {
    const e = err ?? ctx;
    process.stderr.write(`oidc-provider peer: ${event}: ${e?.name ?? ''} ${e?.message ?? ''}${e?.error_description ? ` (${e.error_description})` : ''}\n`);
  };
  for (const event of ['server_error', 'authorization.error', 'grant.error', 'userinfo.error', 'end_session.error', 'jwks.error', 'discovery.error']) {
    provider.on(event, log(event));
  }
}

function main() {
  const clients = loadClients();
  const accounts = loadAccounts();
  const port = Number(process.argv[2] ?? process.env.OIDC_PORT ?? 0);
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`bad port ${port}`);

  const server = http.createServer();
  server.on('error', (err) => fail(`cannot listen on ${HOST}:${port}: ${err.message}`));
  server.listen(port, HOST, () => {
    const issuer = `http://${HOST}:${server.address().port}`;
    const provider = new Provider(issuer, configuration(clients, accounts));
    logEvents(provider);
    const interactions = makeInteractions(provider, accounts);
    const callback = provider.callback();

    server.on('request', async (req, res) => {
      const url = new URL(req.url, issuer);
      try {
        if (await interactions(req, res, url)) return;
      } catch (err) {
        process.stderr.write(`oidc-provider peer: interaction ${req.method} ${url.pathname}: ${err.name}: ${err.message}\n`);
        if (!res.headersSent) send(res, 400, `${err.name}: ${err.message}\n`, 'text/plain');
        return;
      }
      callback(req, res);
    });

    process.stdout.write(`READY ${issuer}\n`);
  });

  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (process.env.OIDC_EXIT_ON_STDIN_CLOSE === '1') {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
  }
}

main();
