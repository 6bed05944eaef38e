// HS256 tokens for a gateway started with `--auth --auth-hs256-secret
// KID=SECRET`, minted here as an identity provider would.

import { createHmac } from "node:crypto";

export const KID = "e2e";
export const SECRET = "0123456789abcdef0123456789abcdef";
/** The gateway flags that make it accept these tokens, with no leeway on exp. */
export const AUTH_ARGS = ["--auth", "--auth-hs256-secret", `${KID}=${SECRET}`, "--auth-leeway-s", "0"];

const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");

/** A JWT for `claims` (exp, channels, sub, send...) signed with SECRET. */
export function mint(claims) {
  const signed = `${b64url({ alg: "HS256", typ: "JWT", kid: KID })}.${b64url(claims)}`;
  return `${signed}.${createHmac("sha256", SECRET).update(signed).digest("base64url")}`;
}
