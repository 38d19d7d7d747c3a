//! `GET /v1/models` and `GET /v1/models/{id}`: every registered model, with its type and where
//! it is in its life (extensions to OpenAI's model object).

use warp::reply::Response;

use crate::error::PoolError;
use crate::http::api::{ModelList, ModelObject};
use crate::http::app::AppState;
use crate::http::reply::ok_json;
use crate::http::timer::{ReqTimer, respond};
use crate::state::ModelStatus;

fn model_object(state: &AppState, m: &ModelStatus) -> ModelObject {
    ModelObject {
        id: m.id.to_string(),
        object: "model",
        created: state.started_unix,
        owned_by: "modelpool",
        model_type: m.model_type,
        state: m.phase,
    }
}

/// `GET /v1/models`.
pub(crate) async fn list_models(state: AppState) -> Response {
    let timer = ReqTimer::start(&state, "models");
    let status = state.pool.status();
    let data = status.models.iter().map(|m| model_object(&state, m)).collect();
    respond(timer, ok_json(&ModelList { object: "list", data }))
}

/// `GET /v1/models/{id}`.
pub(crate) async fn get_model(state: AppState, id: String) -> Response {
    let mut timer = ReqTimer::start(&state, "models");
    timer.set_model(&id);
    let status = state.pool.status();
    let res = match status.models.iter().find(|m| *m.id == *id) {
        Some(m) => ok_json(&model_object(&state, m)),
        None => Err(PoolError::ModelNotFound(id).into()),
    };
    respond(timer, res)
}
