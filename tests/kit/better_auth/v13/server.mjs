// Better Auth 1.3.34 + its built-in mcp plugin (oidcProvider tables: oauthApplication with
// redirectURLs, oauthAccessToken, oauthConsent) on PostgreSQL.
// Usage: DATABASE_URL=postgres://... PORT=0 node v13/server.mjs   (see ../common.mjs)
import { betterAuth } from "better-auth";
import { getMigrations } from "better-auth/db";
import { toNodeHandler } from "better-auth/node";
import { mcp } from "better-auth/plugins";
import pg from "pg";
import { migrate, serve, settings } from "../common.mjs";

await serve(async ({ origin, baseURL, basePath }) => {
  const { databaseUrl, secret } = settings();
  const pool = new pg.Pool({ connectionString: databaseUrl, max: 4 });
  const options = {
    appName: "dcr-reaper kit (better-auth 1.3)",
    baseURL,
    basePath,
    secret,
    database: pool,
    telemetry: { enabled: false },
    rateLimit: { enabled: false },
    emailAndPassword: { enabled: true, requireEmailVerification: false },
    plugins: [
      // /mcp/register accepts anyone; a refresh adds a new oauthAccessToken row (no rotation).
      mcp({
        loginPage: `${origin}/sign-in`,
        oidcConfig: { loginPage: `${origin}/sign-in`, requirePKCE: true },
      }),
    ],
  };
  await migrate(getMigrations, options, "better-auth 1.3");
  const auth = betterAuth(options);
  return { handler: toNodeHandler(auth), close: () => pool.end() };
});
