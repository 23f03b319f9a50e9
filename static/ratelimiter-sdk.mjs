/**
 * RateLimiter browser SDK as an ES module, served at /sdk.mjs:
 *
 *   import RateLimiter, { RateLimitError } from "https://api.example/sdk.mjs";
 *
 * It loads the classic script /sdk.js (which defines globalThis.RateLimiter and has no `export`,
 * so it also works from a plain <script> tag) and re-exports that same object.
 */
import './sdk.js';

const RateLimiter = globalThis.RateLimiter;

export const { init, version, RateLimiterClient, RateLimiterError, RateLimitError } = RateLimiter;
export { RateLimiter };
export default RateLimiter;
