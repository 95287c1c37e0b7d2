const fs = require('fs');
const path = require('path');
const Mustache = require('mustache');

// Read once, when the instance loads the function.
const template = fs.readFileSync(path.join(__dirname, 'templates', 'card.mustache'), 'utf8');

module.exports.handler = async (params) => ({
  card: Mustache.render(template, { name: params.name, occasion: params.occasion || 'birthday' }),
});
