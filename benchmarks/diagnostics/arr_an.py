import json,sys,numpy as np
for f in sys.argv[1:]:
    recs=[json.loads(l) for l in open(f) if l.strip()]
    steps=[r for r in recs if 'run_s' in r]
    adds=[r for r in recs if r.get('class')=='online' and 'added' in r and r.get('arrived')]
    cats={}
    for a in adds:
        # step running at arrival: start t <= arrived < t+plan+run+apply
        run=None
        for s in steps:
            end=s['t']+s['plan_s']+s['run_s']+s['apply_s']
            if s['t']<=a['arrived']<end: run=s;break
        w=(a['t']-a['arrived'])*1e3
        if run is None: k='idle'; extra=''
        else:
            off=run['offline'][0]>0 or run['offline'][1]>0
            k=('stopped' if run['stopped_at_layer'] is not None else 'ran') + ('+off' if off else '-online')
            runend=run['t']+run['plan_s']+run['run_s']
            extra=(runend-a['arrived'])*1e3, run['apply_s']*1e3, (a['t']-runend-run['apply_s'])*1e3
        cats.setdefault(k,[]).append((w,extra))
    print(f)
    for k,v in cats.items():
        w=np.array([x[0] for x in v]); 
        e=np.array([x[1] for x in v if x[1]!=''])
        s=f'  {k:14s} n={len(v):3d} wait p50 {np.median(w):6.1f} mean {w.mean():6.1f} max {w.max():6.1f}'
        if len(e): s+=f' | to run end {np.median(e[:,0]):5.1f} apply {np.median(e[:,1]):5.1f} after {np.median(e[:,2]):5.1f} (means {e[:,0].mean():.1f} {e[:,1].mean():.1f} {e[:,2].mean():.1f})'
        print(s)
