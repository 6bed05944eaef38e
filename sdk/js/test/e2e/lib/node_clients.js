// SDK clients in Node, reporting to a Recorder like the page's do. Node 20
// has no WebSocket of its own: the `ws` package is handed to the SDK.

import { pathToFileURL } from "node:url";
import WebSocket from "ws";
import { watch } from "../fixtures/report.js";
import { sdkEntry } from "./browser.js";

let sdk;

/** Opens and connects an SDK client named `name`; returns it. */
export async function openNodeClient(recorder, name, options) {
  sdk ??= await import(pathToFileURL(sdkEntry()).href);
  const client = new sdk.Client({ WebSocket, ...options });
  watch(client, name, (event) => recorder.push(event));
  client.connect();
  return client;
}
