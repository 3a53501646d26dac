// How a browser script reports to the Rust test that runs it (see
// `run_browser` in tests/harness.rs): one line "RESULT <json>", printed
// once, also when the scenario runs out of time.

/**
 * Arms the scenario's deadline (`arg.timeoutMs`, 90 s by default) and
 * returns `done(code)`, which prints `result` and exits.
 */
export function scenario(arg, result) {
  const done = (code) => {
    console.log('RESULT ' + JSON.stringify(result));
    process.exit(code);
  };
  setTimeout(() => {
    result.error = 'scenario timed out';
    done(1);
  }, arg.timeoutMs ?? 90000);
  return done;
}
