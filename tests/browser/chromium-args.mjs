// Flags of every headless Chromium that the tests and benchmarks start
// (Debian's /usr/bin/chromium, nothing downloaded).

/** Flags every test browser is started with. */
export const CHROMIUM_ARGS = ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];

/**
 * A viewer of a real sandcast server: video plays without a gesture, WebRTC
 * may use loopback candidates, and pages on 127.0.0.1 may reach the
 * server's other addresses (Chromium's local-network checks are for the web,
 * not for a test host).
 */
export const VIEWER_ARGS = [
  ...CHROMIUM_ARGS,
  '--autoplay-policy=no-user-gesture-required',
  '--allow-loopback-in-peer-connection',
  '--disable-features=LocalNetworkAccessChecks,PrivateNetworkAccessSendPreflights,PrivateNetworkAccessRespectPreflightResults,BlockInsecurePrivateNetworkRequests',
];
