'use strict';
// Fails on purpose, to show what a client gets when a function throws:
// the message, the error's type, the line and column in this file and a
// stack trace with no host paths.

function readSetting(settings) {
  // settings is undefined here: reading a property of it throws a TypeError.
  return settings.level;
}

function loadConfig() {
  const config = {};
  return readSetting(config.settings);
}

module.exports.handler = (params, context) => {
  if (typeof params.message === 'string') {
    throw new Error(params.message);
  }
  return { level: loadConfig() };
};
