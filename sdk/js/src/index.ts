export { Client } from "./client.js";
export type { Options, State, StateEvent, Transport } from "./client.js";
export type { Message } from "./frames.js";
