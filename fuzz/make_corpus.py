import os, struct, zlib, gzip, json, shutil, sys
root = sys.argv[1]; imgs = sys.argv[2]; fixtures = sys.argv[3]
def put(target, name, data):
    d = os.path.join(root, target); os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), 'wb').write(data)

# ---- safetensors
def st(tensors, meta=None):
    header = {}; data = b''
    if meta is not None: header['__metadata__'] = meta
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {'dtype': dtype, 'shape': shape, 'data_offsets': [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode(); h += b' ' * (-len(h) % 8)
    return struct.pack('<Q', len(h)) + h + data
put('safetensors', 'empty', st({}))
put('safetensors', 'f32_meta', st({'w': ('F32', [2, 3], struct.pack('<6f', *range(6)))}, {'format': 'pt'}))
put('safetensors', 'dtypes', st({'a': ('F64', [2], struct.pack('<2d', 1.5, -2)), 'b': ('F16', [3], b'\x00\x3c' * 3),
                                 'c': ('BF16', [1, 2], b'\x80\x3f' * 2), 'd': ('I64', [1], struct.pack('<q', -7)),
                                 'e': ('I32', [2], struct.pack('<2i', 1, 2)), 'f': ('I16', [1], b'\x01\x00'),
                                 'g': ('I8', [2], b'\x01\xff'), 'h': ('U8', [3], b'abc'), 'i': ('BOOL', [2], b'\x00\x01')}))
put('safetensors', 'scalar_and_zero', st({'s': ('F32', [], struct.pack('<f', 3)), 'z': ('F32', [0, 4], b'')}))
put('safetensors', 'nonfinite', st({'n': ('F32', [3], struct.pack('<3f', float('nan'), float('inf'), -0.0))}))
put('safetensors', 'bad_offsets', struct.pack('<Q', 56) + b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}' + b'\0' * 8)
put('safetensors', 'deep_header', (lambda h: struct.pack('<Q', len(h)) + h)(b'{"a":' * 300 + b'1' + b'}' * 300))

# ---- IDX
def idx(dims, data):
    return bytes([0, 0, 8, len(dims)]) + b''.join(struct.pack('>I', d) for d in dims) + data
put('idx', 'labels', idx([10], bytes(range(10))))
put('idx', 'images', idx([2, 3, 3], bytes(range(18))))
put('idx', 'images_gz', gzip.compress(idx([2, 4, 4], bytes(range(32))), mtime=0))
put('idx', 'truncated', idx([4, 28, 28], bytes(100)))
put('idx', 'huge_claim', idx([1 << 30, 1 << 30], b''))
put('idx', 'trailing', idx([2], b'\x01\x02\x03'))

# ---- image folders: first byte = name (% 4: png jpg jpeg bmp) + 4 * channels choice (0 own, 1 grey, 2 RGB)
names = {'png': 0, 'jpg': 1, 'bmp': 3}
for f in sorted(os.listdir(imgs)):
    stem, ext = f.split('.')
    data = open(os.path.join(imgs, f), 'rb').read()
    for ch in range(3):
        put('image_folder', f'{stem}_{ext}_ch{ch}', bytes([names.get(ext, 0) + 4 * ch]) + data)
def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
png = lambda ihdr, idat: b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')
put('image_folder', 'regress_reserved_deflate_block', b'\x04' + png(struct.pack('>IIBBBBB', 1, 1, 8, 0, 0, 0, 0), b'\x78\x01\x07\0\0\0\0\0'))
put('image_folder', 'regress_tga_44612x5954', b'\x00' + b'\0\0\x02\0\0\0\0\0\0\0\0\0\x44\xae\x42\x17\x18\0')
put('image_folder', 'png16', b'\x00' + png(struct.pack('>IIBBBBB', 2, 1, 16, 0, 0, 0, 0), zlib.compress(b'\0\x12\x34\xff\xff')))
put('image_folder', 'palette', b'\x00' + b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 2, 1, 8, 3, 0, 0, 0)) +
    chunk(b'PLTE', b'\xff\0\0\0\xff\0') + chunk(b'IDAT', zlib.compress(b'\0\0\1')) + chunk(b'IEND', b''))

# ---- JSON configs: first byte % 9 picks the reader (scheduler, unet, vae, classifier, feature net, train, vae
# train, classifier train, loop options); / 9 + 1 is the sampling steps for scheduler configs
def js(name, which, text, steps=10):
    put('json_configs', name, bytes([which + 9 * (steps - 1)]) + text)
for f in sorted(os.listdir(os.path.join(fixtures, 'scheduler'))):
    if f.endswith('.json'):
        js('scheduler_' + f, 0, open(os.path.join(fixtures, 'scheduler', f), 'rb').read())
js('scheduler_dpm', 0, b'{"_class_name":"DPMSolverMultistepScheduler","solver_order":3,"use_karras_sigmas":true}', 7)
js('scheduler_unipc_zsnr', 0, b'{"_class_name":"UniPCMultistepScheduler","rescale_betas_zero_snr":true,"timestep_spacing":"trailing","prediction_type":"v_prediction"}', 4)
js('scheduler_flow', 0, b'{"_class_name":"FlowMatchEulerDiscreteScheduler","shift":3.0}', 5)
js('scheduler_nonfinite', 0, b'{"beta_start":NaN,"beta_end":Infinity}')
js('unet_diffusers', 1, open(os.path.join(fixtures, 'diffusers', 'unet', 'config.json'), 'rb').read())
js('unet_040', 1, open(os.path.join(fixtures, 'diffusers-0.40', 'unet', 'config.json'), 'rb').read())
js('vae_diffusers', 2, open(os.path.join(fixtures, 'diffusers', 'vae', 'config.json'), 'rb').read())
js('classifier', 3, b'{}')
js('feature_net', 4, b'{}')
js('train', 5, b'{"kind":"unet","prediction":"v","loss_weight":"min_snr","loop":{"steps":10,"lr":0.001,"seed":3}}')
js('train_flow', 5, b'{"kind":"unet","path":"rectified-flow","prediction":"flow","timestep_density":"logit-normal"}')
js('vae_train', 6, b'{"kind":"vae","reconstruction":"l2"}')
js('classifier_train', 7, b'{"kind":"classifier"}')
js('loop', 8, b'{"steps":-1,"batch":1e300,"threads":0}')
js('deep', 5, b'{"a":' * 300 + b'1' + b'}' * 300)
