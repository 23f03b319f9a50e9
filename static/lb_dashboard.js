'use strict';
const $ = (id) => document.getElementById(id);
function cell(row, text, cls) {
  const td = document.createElement('td');
  td.textContent = String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
}
function render(stats) {
  $('total').textContent = String(stats.total_requests);
  $('healthy').textContent = String(stats.backends.filter((b) => b.healthy).length);
  $('cache-hits').textContent = String(stats.cache.hits);
  $('cache-misses').textContent = String(stats.cache.misses);
  $('cache-entries').textContent = String(stats.cache.entries);
  const fa = stats.forward_auth;
  $('fa-url').textContent = fa.url ? fa.url + ' (fail ' + fa.fail + ')' : 'off';
  $('fa-admitted').textContent = String(fa.admitted);
  $('fa-refused').textContent = String(fa.refused);
  $('fa-errors').textContent = String(fa.errors);
  const select = $('strategy');
  if (select.options.length !== stats.strategies.length) {
    select.replaceChildren(...stats.strategies.map((name) => new Option(name, name)));
  }
  if (document.activeElement !== select) select.value = stats.strategy;
  const body = $('backends');
  body.replaceChildren(...stats.backends.map((b) => {
    const row = document.createElement('tr');
    cell(row, b.url);
    cell(row, b.healthy ? 'up' : 'down', b.healthy ? 'up' : 'down');
    cell(row, b.weight);
    cell(row, b.active_connections);
    cell(row, b.total_requests);
    cell(row, b.failures);
    cell(row, b.avg_response_ms.toFixed(1));
    return row;
  }));
}
async function poll() {
  try {
    const resp = await fetch('/stats', {cache: 'no-store'});
    render(await resp.json());
    $('error').textContent = '';
  } catch (err) {
    $('error').textContent = 'cannot reach /stats: ' + err;
  }
}
$('token').value = sessionStorage.getItem('lbAdminToken') || '';
$('token').addEventListener('change', () => sessionStorage.setItem('lbAdminToken', $('token').value));
$('strategy').addEventListener('change', async (event) => {
  const headers = {'Content-Type': 'application/json'};
  if ($('token').value) headers.Authorization = 'Bearer ' + $('token').value;
  const resp = await fetch('/change_strategy', {
    method: 'POST', headers,
    body: JSON.stringify({strategy: event.target.value}),
  });
  const data = await resp.json();
  $('strategy-status').textContent = resp.ok ? 'switched' : data.message;
  poll();
});
poll();
setInterval(poll, 1000);
