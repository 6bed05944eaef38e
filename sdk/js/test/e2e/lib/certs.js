// A throwaway certificate authority and a server certificate it signed, made
// with the openssl command-line tool (Node's crypto reads X.509 but cannot
// create it), in a temporary directory removed by `remove()`.

import { spawnSync } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** Days the certificates are valid: the run only needs minutes. */
const DAYS = "2";

function openssl(args, dir) {
  const r = spawnSync("openssl", args, { cwd: dir, encoding: "utf8" });
  if (r.error) throw new Error(`openssl ${args[0]}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`openssl ${args.join(" ")} exited ${r.status}:\n${r.stderr}`);
  return r.stdout;
}

/** Fails with a clear message when the openssl CLI is not installed. */
function requireOpenssl() {
  const r = spawnSync("sh", ["-c", "command -v openssl"], { encoding: "utf8" });
  if (r.status !== 0 || !r.stdout.trim()) {
    throw new Error("the TLS tests need the openssl command-line tool to make their certificates: apt-get install -y openssl");
  }
}

/**
 * A CA and a leaf certificate for `names` (host names and IP addresses, in
 * its subjectAltName), both P-256. Returns the files' paths (`caFile`,
 * `certFile`, `keyFile`), their PEM text (`cert`, `key`), `spki`: the
 * base64 SHA-256 of the leaf's SubjectPublicKeyInfo (what Chromium's
 * `--ignore-certificate-errors-spki-list` takes), and `remove()`.
 */
export function makeCertificates(names) {
  requireOpenssl();
  const dir = mkdtempSync(join(tmpdir(), "gateway-e2e-tls-"));
  try {
    const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
      ["req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", DAYS, "-subj", "/CN=gateway e2e test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
      dir,
    );
    openssl(["req", ...ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", `/CN=${names[0]}`], dir);
    const san = names.map((n) => (/^[\d.]+$|:/.test(n) ? `IP:${n}` : `DNS:${n}`)).join(",");
    writeFileSync(
      join(dir, "leaf.ext"),
      [
        `subjectAltName=${san}`,
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        "extendedKeyUsage=serverAuth",
        "",
      ].join("\n"),
    );
    openssl(
      ["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.pem", "-days", DAYS, "-extfile", "leaf.ext"],
      dir,
    );
    const cert = readFileSync(join(dir, "leaf.pem"), "utf8");
    const key = readFileSync(join(dir, "leaf.key"), "utf8");
    const spkiDer = new X509Certificate(cert).publicKey.export({ type: "spki", format: "der" });
    return {
      dir,
      caFile: join(dir, "ca.pem"),
      certFile: join(dir, "leaf.pem"),
      keyFile: join(dir, "leaf.key"),
      cert,
      key,
      spki: createHash("sha256").update(spkiDer).digest("base64"),
      remove: () => rmSync(dir, { recursive: true, force: true }),
    };
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}
