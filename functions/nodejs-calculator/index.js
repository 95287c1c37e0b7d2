'use strict';
// Basic arithmetic over a list of numbers: the contract's example function.
// subtract and divide fold left: values [10, 2, 3] subtract to 10 - 2 - 3 = 5.

const OPERATIONS = {
  add: (a, b) => a + b,
  subtract: (a, b) => a - b,
  multiply: (a, b) => a * b,
  divide: (a, b) => {
    if (b === 0) throw invalidParams("Division by zero: a divisor in 'values' is 0");
    return a / b;
  },
};

// An error with code INVALID_PARAMS reaches the client as 400 INVALID_PARAMS.
function invalidParams(message) {
  return Object.assign(new Error(message), { code: 'INVALID_PARAMS' });
}

module.exports.handler = async (params, context) => {
  const { operation, values } = params;
  const apply = Object.prototype.hasOwnProperty.call(OPERATIONS, operation) ? OPERATIONS[operation] : undefined;
  if (apply === undefined) {
    throw invalidParams(`unknown operation ${JSON.stringify(operation)}; expected add, subtract, multiply or divide`);
  }
  if (!Array.isArray(values) || values.length === 0 || !values.every((v) => typeof v === 'number' && Number.isFinite(v))) {
    throw invalidParams('"values" must be a non-empty array of numbers');
  }
  return { value: values.reduce((acc, v) => apply(acc, v)) };
};
