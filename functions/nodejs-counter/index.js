'use strict';
// A counter in module scope. It lives as long as the instance, so a session
// initialized with retain_session: true sees it grow across its executions,
// while a fresh instance starts again from 0.

let count = 0;

module.exports.handler = (params, context) => {
  const step = params.step === undefined ? 1 : params.step;
  if (!Number.isSafeInteger(step)) {
    throw Object.assign(new Error('"step" must be an integer'), { code: 'INVALID_PARAMS' });
  }
  count += step;
  return { count };
};
