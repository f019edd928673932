// The page of `infd view`: one or two OpenSeadragon viewers over the server's DZI images.
'use strict';

const $ = (id) => document.getElementById(id);
const view = { info: null, image: null, size: null, size2: null };
window.infdView = view;  // for scripts and tests: the viewers and what they show

function status(text, isError = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
}

function makeViewer(id) {
  const viewer = OpenSeadragon({
    id, prefixUrl: 'static/openseadragon/images/', showNavigator: true,
    navigatorPosition: 'BOTTOM_RIGHT', maxZoomPixelRatio: 4, visibilityRatio: 0.5,
    animationTime: 0.5, imageLoaderLimit: 16,
    timeout: 600000,  // ms; a first tile waits for sampling and compilation
  });
  viewer.addHandler('add-item', (e) => e.item.addHandler('fully-loaded-change', showLoading));
  viewer.addHandler('tile-load-failed', (e) => status(`a tile failed: ${e.message}`, true));
  viewer.addHandler('open-failed', (e) => status(`cannot open: ${e.message}`, true));
  return viewer;
}

// True when every tile each viewer needs for its current view is drawn.
view.loaded = () => [view.left, view.right].every((viewer) => {
  const item = viewer.world.getItemAt(0);
  return viewer.container.offsetParent === null || (item !== undefined && item.getFullyLoaded());
});

function showLoading() {
  if (!$('status').classList.contains('error')) status(view.loaded() ? '' : 'rendering tiles');
}

// Pan and zoom the other viewer with this one (both images are 1 wide in viewport units).
// One flag for both directions: the copy's own zoom and pan events must not echo back.
let syncing = false;
function follow(leader, other) {
  const copy = () => {
    if (syncing || $('pane-right').hidden) return;
    syncing = true;
    other.viewport.zoomTo(leader.viewport.getZoom(), null, true);
    other.viewport.panTo(leader.viewport.getCenter(), true);
    syncing = false;
  };
  leader.addHandler('zoom', copy);
  leader.addHandler('pan', copy);
  return copy;
}

function dziUrl(image, size) {
  return `dzi/${encodeURIComponent(image)}/${encodeURIComponent(size)}.dzi`;
}

function label(image, size) {
  return view.info.kind === 'model' ? `${image} at ${Number(size).toLocaleString()} px` : image;
}

function show() {
  let image = $('file').value, size = 'full', size2 = null;
  if (view.info.kind === 'model') {
    image = `${$('seed').value}-${$('index').value}`;
    size = $('size').value;
    size2 = $('compare').checked ? $('size2').value : null;
    location.hash = `seed=${$('seed').value}&index=${$('index').value}&size=${size}` +
      (size2 ? `&compare=${size2}` : '');
  }
  status('');
  $('pane-right').hidden = !size2;
  if (image !== view.image || size !== view.size) {
    view.left.open(dziUrl(image, size));
    $('label-left').textContent = label(image, size);
  }
  if (size2 && (image !== view.image || size2 !== view.size2)) {
    view.right.open(dziUrl(image, size2));
    $('label-right').textContent = label(image, size2);
  } else if (!size2) {
    view.right.close();
  }
  Object.assign(view, { image, size, size2 });
}

// The URL of the region the left viewer shows, saved at `scale` times the screen's pixels.
view.savedViewUrl = (scale) => {
  const viewer = view.left;
  const bounds = viewer.viewport.getBounds(true);
  const width = Math.round(viewer.container.clientWidth * window.devicePixelRatio * scale);
  const query = new URLSearchParams({ image: view.image, size: view.size, x: bounds.x,
                                      y: bounds.y, w: bounds.width, h: bounds.height, width });
  return `view.png?${query}`;
};

async function save() {
  const scale = Number($('scale').value);
  status('rendering the saved view');
  const response = await fetch(view.savedViewUrl(scale));
  if (!response.ok) {
    status(`cannot save: ${await response.text()}`, true);
    return;
  }
  const link = document.createElement('a');
  link.href = URL.createObjectURL(await response.blob());
  link.download = `${view.image}_${view.size}_x${scale}.png`.replace(/[^\w.-]/g, '_');
  link.click();
  URL.revokeObjectURL(link.href);
  status('saved');
}

async function init() {
  view.info = await (await fetch('api/info')).json();
  view.left = makeViewer('left');
  view.right = makeViewer('right');
  const leftToRight = follow(view.left, view.right);
  view.left.addHandler('open', leftToRight);
  view.right.addHandler('open', leftToRight);  // a new right image starts at the left's view
  follow(view.right, view.left);
  if (view.info.kind === 'model') {
    const hash = new URLSearchParams(location.hash.slice(1));
    $('seed').value = hash.get('seed') ?? view.info.defaults.seed;
    $('index').value = hash.get('index') ?? 0;
    $('size').value = hash.get('size') ?? view.info.defaults.size;
    $('size').max = $('size2').max = view.info.max_size;
    $('compare').checked = hash.has('compare');
    if (hash.has('compare')) $('size2').value = hash.get('compare');
    $('sample').hidden = false;
    $('sample').addEventListener('submit', (e) => { e.preventDefault(); show(); });
    $('compare').addEventListener('change', show);
    $('new').addEventListener('click', () => {
      $('seed').value = Math.floor(Math.random() * view.info.max_seed);
      $('index').value = 0;
      show();
    });
  } else {
    for (const name of view.info.images) $('file').add(new Option(name, name));
    $('files').hidden = false;
    $('file').addEventListener('change', show);
  }
  $('save').addEventListener('click', () => save().catch((e) => status(String(e), true)));
  show();
}

init().catch((e) => status(`cannot start: ${e}`, true));
